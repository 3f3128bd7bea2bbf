"""Starting, resuming and sampling runs: glue between the CLI, the run folder and the trainer.

Under torchrun every rank calls the same function; rank 0 prepares data and creates the run
folder while the others wait, and a user error on rank 0 is raised on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.config import Config, check_resume_changes, file_dict, from_dict, load_config, to_toml
from kiln.data.shards import Prepared, prepare
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import CheckpointError
from kiln.eval.generate import generate
from kiln.model.registry import build_model
from kiln.parallel.runtime import Parallel
from kiln.progress import console, quiet
from kiln.runs.rundir import RunDir
from kiln.train import checkpoint as ckpt
from kiln.train.precision import autocast_for, resolve_device, resolve_precision
from kiln.train.trainer import Trainer


def _log(text: str) -> None:
    if not quiet():
        console.print(text)


def _prepare_everywhere(cfg: Config, par: Parallel) -> Prepared:
    data = par.main_first(lambda: prepare(cfg.data, log=_log))
    return data if par.is_main else prepare(cfg.data, log=lambda _: None)


def start_run(cfg: Config, runs_dir: Path, name: str, hooks: list[Any] = ()) -> dict[str, Any]:
    """Prepare data, create `runs_dir/name`, train, and return the summary."""
    par = Parallel.setup(cfg, resolve_device(cfg))
    name = par.broadcast(name)
    data = _prepare_everywhere(cfg, par)  # before creating the run: bad data leaves no empty run behind

    def create() -> RunDir:
        run = RunDir.create(runs_dir, name, cfg)
        data.tokenizer.save(run.path / "tokenizer.json")
        return run

    par.main_first(create)
    run = RunDir(Path(runs_dir) / name)
    trainer = Trainer.build(cfg, run, data, par)
    trainer.hooks.extend(hooks)
    _log(f"run folder: {run.path}")
    try:
        summary = trainer.fit()
    finally:
        par.shutdown()
    return {"run": str(run.path), **summary}


def resume_run(path: Path, overrides: list[str] = (), hooks: list[Any] = ()) -> dict[str, Any]:
    """Continue `path` from its newest valid checkpoint (or from scratch if it has none)."""
    run = RunDir.open(path)
    saved = file_dict(run.config_path)
    cfg = load_config(overrides=overrides, base=saved)
    check_resume_changes(from_dict(saved), cfg)
    par = Parallel.setup(cfg, resolve_device(cfg))
    data = _prepare_everywhere(cfg, par)
    latest = par.main_first(lambda: ckpt.latest_valid_checkpoint(run.checkpoints, warn=_log))
    latest = par.broadcast(latest)
    state = None
    if latest is not None:
        state = ckpt.read_state(latest)
        if state["trainer"]["data_key"] != data.manifest["key"]:
            raise CheckpointError(f"the data of {path} changed since its checkpoint (dataset "
                                  f"{state['trainer']['data_key']} -> {data.manifest['key']}); resume needs the same "
                                  "corpus, tokenizer and split")
    trainer = Trainer.build(cfg, run, data, par, resume_state=state)
    trainer.hooks.extend(hooks)
    if latest is not None:
        trainer.restore(latest)
        _log(f"resumed {path} from {latest.name}")
    elif par.is_main:
        run.truncate_after(0)
        _log(f"{path} has no valid checkpoint; starting it from step 0")
    if overrides and par.is_main:
        run.write_text("config.toml", to_toml(cfg))
    par.barrier()
    try:
        summary = trainer.fit()
    finally:
        par.shutdown()
    return {"run": str(run.path), **summary}


def choose_checkpoint(run: RunDir, step: int | None) -> Path:
    if step is None:
        chosen = ckpt.latest_valid_checkpoint(run.checkpoints, warn=_log)
        if chosen is None:
            raise CheckpointError(f"{run.path} has no valid checkpoint to load")
        return chosen
    chosen = run.checkpoints / ckpt.step_dir_name(step)
    problem = ckpt.verify_checkpoint(chosen) if chosen.is_dir() else "it does not exist"
    if problem:
        raise CheckpointError(f"checkpoint step {step} of {run.path} is unusable: {problem}")
    return chosen


def load_run_model(path: Path, step: int | None = None) -> tuple[Config, torch.nn.Module, Any, torch.device, str]:
    """(config, whole model with the checkpoint's weights, tokenizer, device, precision) for a run,
    in this one process, whatever layout saved the checkpoint."""
    run = RunDir.open(path)
    cfg = from_dict(file_dict(run.config_path))
    tokenizer = load_tokenizer(run.path / "tokenizer.json")
    chosen = choose_checkpoint(run, step)
    device = resolve_device(cfg)
    model = build_model(cfg.model, tokenizer.vocab_size).to(device)
    ckpt.load_weights(chosen, [model])
    state = ckpt.read_state(chosen)
    precision = state["trainer"].get("precision") or resolve_precision(cfg, device)
    return cfg, model.eval(), tokenizer, device, precision


def export_run(path: Path, out: Path, step: int | None = None) -> Path:
    """Consolidate a (possibly sharded) checkpoint into one safetensors file of full weights."""
    run = RunDir.open(path)
    cfg = from_dict(file_dict(run.config_path))
    tokenizer = load_tokenizer(run.path / "tokenizer.json")
    model = build_model(cfg.model, tokenizer.vocab_size)
    return ckpt.export_safetensors(choose_checkpoint(run, step), model, out)


def sample_from_run(path: Path, prompts: list[str], max_tokens: int, temperature: float, top_k: int,
                    top_p: float, seed: int = 0, step: int | None = None) -> list[str]:
    cfg, model, tokenizer, device, precision = load_run_model(path, step)
    if cfg.model.family == "encoder":  # an encoder fills the prompt's <|mask|> tokens instead
        from kiln.eval.fill import fill_prompt

        return [fill_prompt(model, tokenizer, p, cfg.model.seq_len, device, autocast_for(device, precision))
                for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor(tokenizer.encode(prompt) or [tokenizer.eos_id], device=device)
        with autocast_for(device, precision)():
            full = generate(model, ids, max_tokens, cfg.model.seq_len, temperature, top_k, top_p,
                            vocab_size=tokenizer.vocab_size, stop_id=tokenizer.eos_id, generator=gen)
        out.append(tokenizer.decode(full.tolist()))
    return out
