"""`kiln export`: one safetensors file of a run's full weights at a step, consolidated from
either checkpoint format (single process or sharded across ranks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kiln.model.registry import build_model, resolve_family
from kiln.runs.rundir import RunDir
from kiln.train.checkpoint import checkpoint_step, export_safetensors, write_safetensors


def export_run(path: Path, out: Path, step: int | None = None, warn: Callable[[str], None] = print) -> tuple[Path, int]:
    """The file written and the step it holds (default: the newest valid checkpoint, or step 0 for
    a run with none, such as an import)."""
    run = RunDir.open(path)
    cfg = run.config()
    run.check_family(cfg, resolve_family)  # only the model family: not the suites or callbacks it ran with
    chosen = run.weights_at(step, warn)
    if chosen is None:
        loaded = run.load_model(step, device=torch.device("cpu"), warn=warn)  # says it uses step 0
        return write_safetensors(loaded.model, out), 0
    model = build_model(cfg.model, run.tokenizer().vocab_size)
    return export_safetensors(chosen, model, out), checkpoint_step(chosen)
