"""Starting and resuming training runs: glue between the CLI, the run folder and the trainer.

Under torchrun every rank calls the same function; rank 0 prepares data and creates the run
folder while the others wait, and a user error on rank 0 is raised on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kiln.changes import check_resume_changes
from kiln.config import Config, from_dict, load_config
from kiln.data.dataset import prepare_data
from kiln.data.mixture import MixturePrepared
from kiln.data.multimodal.prepare import MultimodalPrepared
from kiln.data.shards import Prepared
from kiln.errors import CheckpointError
from kiln.parallel.runtime import Parallel
from kiln.plugins import loaded_plugins
from kiln.progress import console, quiet
from kiln.runfolder.folder import RunFolder
from kiln.train import checkpoint as ckpt
from kiln.train.build import build_trainer, check_kernels
from kiln.train.callbacks.base import Callback
from kiln.train.precision import apply_matmul_settings, resolve_device
from kiln.train.resolve import check_training

LAUNCHER_ID = "TORCHELASTIC_RUN_ID"  # torchrun's job id: the same for every restart of one job


def _log(text: str) -> None:
    if not quiet():
        console.print(text)


def _device(cfg: Config) -> torch.device:
    """The training device, with TF32 and determinism applied before anything runs on it."""
    device = resolve_device(cfg)
    apply_matmul_settings(cfg, device)
    return device


def _prepare_everywhere(cfg: Config, par: Parallel) -> Prepared | MixturePrepared | MultimodalPrepared:
    data = par.main_first(lambda: prepare_data(cfg, log=_log))
    if par.is_main:
        assert data is not None  # main_first returns fn's result on the main rank
        return data
    return prepare_data(cfg, log=lambda _: None)


def _fit(trainer) -> dict[str, Any]:
    try:
        summary = trainer.fit()
    finally:
        close = getattr(trainer.sampler, "close", None)  # loader worker processes, if any
        if close is not None:
            close()
        trainer.par.shutdown()
    return {"run": str(trainer.run.path), **summary}


def start_run(cfg: Config, runs_dir: Path, name: str, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Prepare data, create `runs_dir/name`, train, and return the summary. `callbacks` are
    added to the configured ones (for Python callers)."""
    spec = check_training(cfg)
    par = Parallel.setup(cfg, _device(cfg))
    check_kernels(cfg, par)  # before data and the run folder: a refused option leaves nothing behind
    name = par.broadcast(name)
    par.main_first(lambda: RunFolder.check_new(runs_dir, name))
    data = _prepare_everywhere(cfg, par)  # before creating the run: bad data leaves no empty run behind
    run = RunFolder(Path(runs_dir) / name)
    # Built before the folder exists: every option the trainer refuses (layouts, batch splits, callback
    # options, too little validation data) is refused with nothing written. Building writes no file.
    trainer = build_trainer(cfg, spec, run, data, par, callbacks=callbacks)

    def create() -> RunFolder:
        meta = {"plugins": loaded_plugins(), "world_size": par.info.world_size}
        if os.environ.get(LAUNCHER_ID):
            meta["launcher_id"] = os.environ[LAUNCHER_ID]
        created = RunFolder.create(runs_dir, name, cfg, meta)
        data.tokenizer.save(created.tokenizer_path)
        return created

    par.main_first(create)
    _log(f"run folder: {run.path}")
    return _fit(trainer)


def find_restarted_run(runs_dir: Path) -> Path | None:
    """Under a torchrun elastic restart, the run the first attempt of this job created."""
    job = os.environ.get(LAUNCHER_ID)
    if not job or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    found = RunFolder.find(runs_dir, launcher_id=job)
    return found.path if found else None


def resume_run(
    path: Path, overrides: list[str] | tuple[str, ...] = (), callbacks: Iterable[Callback] = ()
) -> dict[str, Any]:
    """Continue `path` from its newest valid checkpoint (or from scratch if it has none)."""
    run = RunFolder.open(path)
    saved = run.config_dict()
    cfg = load_config(overrides=overrides, base=saved)
    saved_steps = ckpt.list_checkpoints(run.checkpoints)
    if saved_steps:  # a run that never saved a step (e.g. one `kiln import` made) is not defined yet
        check_resume_changes(from_dict(saved), cfg)
    spec = run.check_family(cfg, lambda c: check_training(c, fresh=not saved_steps))
    par = Parallel.setup(cfg, _device(cfg))
    data = _prepare_everywhere(cfg, par)
    if par.is_main and not run.tokenizer_path.is_file():  # created but never trained (kiln fork --no-train)
        data.tokenizer.save(run.tokenizer_path)
    latest = ckpt.newest_checkpoint(run.checkpoints, par, warn=_log)  # ranks verify what they read at load
    state = None
    if latest is not None:
        state = ckpt.read_state(latest)
        saved_key = state["trainer"]["data_key"]
        if saved_key not in (data.manifest.get("content_key"), data.manifest["key"]):
            raise CheckpointError(
                f"the data of {path} changed since its checkpoint (dataset {saved_key} -> "
                f"{data.manifest.get('content_key', data.manifest['key'])}); resume needs the "
                "same corpus, tokenizer and split"
            )
    trainer = build_trainer(cfg, spec, run, data, par, resume_state=state, callbacks=callbacks)
    if latest is not None:
        trainer.restore(latest)
        _log(f"resumed {path} from {ckpt.step_dir_name(trainer.step)}")  # an earlier one if a rank found it damaged
    elif par.is_main:
        run.truncate_after(0)
        _log(f"{path} has no valid checkpoint; starting it from step 0")
    if overrides and par.is_main:
        run.write_config(cfg)
    par.barrier()
    return _fit(trainer)
