"""`kiln sample`: text from a run's checkpoint (an encoder fills the prompt's masks instead)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kiln.eval.generate import sample_prompts
from kiln.model.registry import get_spec
from kiln.runs.rundir import RunDir


def sample_from_run(
    path: Path,
    prompts: list[str],
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int = 0,
    step: int | None = None,
    say: Callable[[str], None] = print,
) -> list[str]:
    loaded = RunDir.open(path).load_model(step, warn=say)
    say(f"sampling {Path(path).name} at step {loaded.step}")
    cfg, model, tok = loaded.cfg, loaded.model, loaded.tokenizer
    if not get_spec(cfg.model.family).causal:  # an encoder fills the prompt's <|mask|> tokens instead
        from kiln.eval.fill import fill_prompt

        return [fill_prompt(model, tok, p, cfg.model.seq_len, loaded.device, loaded.autocast) for p in prompts]
    return sample_prompts(
        model,
        tok,
        prompts,
        max_tokens,
        cfg.model.seq_len,
        loaded.device,
        loaded.autocast,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
    )
