"""`kiln export`: one safetensors file of a run's full weights at a step, consolidated from
either checkpoint format (single process or sharded across ranks)."""

from __future__ import annotations

from pathlib import Path

from kiln.model.registry import build_model
from kiln.resolve import check_model
from kiln.runs.rundir import RunDir
from kiln.train.checkpoint import export_safetensors


def export_run(path: Path, out: Path, step: int | None = None) -> Path:
    run = RunDir.open(path)
    cfg = run.config()
    run.check_family(cfg, check_model)  # only the model family: not the suites or callbacks it ran with
    model = build_model(cfg.model, run.tokenizer().vocab_size)
    return export_safetensors(run.checkpoint(step), model, out)
