"""Starting, resuming and sampling runs: glue between the CLI, the run folder and the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.config import Config, file_dict, from_dict, load_config, to_toml
from kiln.data.shards import prepare
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import CheckpointError
from kiln.eval.generate import generate
from kiln.model.registry import build_model
from kiln.progress import console, quiet
from kiln.runs.rundir import RunDir
from kiln.train import checkpoint as ckpt
from kiln.train.precision import autocast_for, resolve_device, resolve_precision
from kiln.train.trainer import Trainer


def _log(text: str) -> None:
    if not quiet():
        console.print(text)


def start_run(cfg: Config, runs_dir: Path, name: str, hooks: list[Any] = ()) -> dict[str, Any]:
    """Prepare data, create `runs_dir/name`, train, and return the summary."""
    data = prepare(cfg.data, log=_log)  # before creating the run: bad data leaves no empty run behind
    run = RunDir.create(runs_dir, name, cfg)
    data.tokenizer.save(run.path / "tokenizer.json")
    trainer = Trainer.build(cfg, run, data)
    trainer.hooks.extend(hooks)
    _log(f"run folder: {run.path}")
    summary = trainer.fit()
    return {"run": str(run.path), **summary}


def resume_run(path: Path, overrides: list[str] = (), hooks: list[Any] = ()) -> dict[str, Any]:
    """Continue `path` from its newest valid checkpoint (or from scratch if it has none)."""
    run = RunDir.open(path)
    cfg = load_config(overrides=overrides, base=file_dict(run.config_path))
    data = prepare(cfg.data, log=_log)
    latest = ckpt.latest_valid_checkpoint(run.checkpoints, warn=_log)
    state = None
    if latest is not None:
        state = ckpt.read_state(latest)
        if state["trainer"]["data_key"] != data.manifest["key"]:
            raise CheckpointError(f"the data of {path} changed since its checkpoint (dataset "
                                  f"{state['trainer']['data_key']} -> {data.manifest['key']}); resume needs the same "
                                  "corpus, tokenizer and split")
    trainer = Trainer.build(cfg, run, data, resume_state=state)
    trainer.hooks.extend(hooks)
    if latest is not None:
        trainer.restore(latest)
        _log(f"resumed {path} from {latest.name}")
    else:
        run.truncate_after(0)
        _log(f"{path} has no valid checkpoint; starting it from step 0")
    if overrides:
        run.write_text("config.toml", to_toml(cfg))
    summary = trainer.fit()
    return {"run": str(run.path), **summary}


def load_run_model(path: Path, step: int | None = None) -> tuple[Config, torch.nn.Module, Any, torch.device, str]:
    """(config, model with the checkpoint's weights, tokenizer, device, precision) for a run."""
    run = RunDir.open(path)
    cfg = from_dict(file_dict(run.config_path))
    tokenizer = load_tokenizer(run.path / "tokenizer.json")
    if step is None:
        chosen = ckpt.latest_valid_checkpoint(run.checkpoints, warn=_log)
    else:
        chosen = run.checkpoints / ckpt.step_dir_name(step)
        problem = ckpt.verify_checkpoint(chosen) if chosen.is_dir() else "it does not exist"
        if problem:
            raise CheckpointError(f"checkpoint step {step} of {path} is unusable: {problem}")
    if chosen is None:
        raise CheckpointError(f"{path} has no valid checkpoint to load")
    device = resolve_device(cfg)
    model = build_model(cfg.model, tokenizer.vocab_size).to(device)
    ckpt.load_model_weights(chosen, model)
    state = ckpt.read_state(chosen)
    precision = state["trainer"].get("precision") or resolve_precision(cfg, device)
    return cfg, model.eval(), tokenizer, device, precision


def sample_from_run(path: Path, prompts: list[str], max_tokens: int, temperature: float, top_k: int,
                    top_p: float, seed: int = 0, step: int | None = None) -> list[str]:
    cfg, model, tokenizer, device, precision = load_run_model(path, step)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor(tokenizer.encode(prompt) or [tokenizer.eos_id], device=device)
        with autocast_for(device, precision)():
            full = generate(model, ids, max_tokens, cfg.model.seq_len, temperature, top_k, top_p,
                            vocab_size=tokenizer.vocab_size, stop_id=tokenizer.eos_id, generator=gen)
        out.append(tokenizer.decode(full.tolist()))
    return out
