"""Checkpoints: written atomically, verified by sha256, loadable at any world size.

    checkpoints/step-00000100/
        model.safetensors       single process: full weights, keyed by parameter name
        optimizer.safetensors   single process: optimizer state, keyed "<parameter name>/<state>"
        dcp/                    distributed: torch.distributed.checkpoint shards (model + optimizer)
        rng-<rank>.safetensors  torch (and CUDA) generator states of each rank
        state.json              step, trainer state, python/numpy RNG
        manifest.json           sha256 and size of every file above; written last (the commit marker)

State dicts are keyed by parameter name in both formats (through
`torch.distributed.checkpoint.state_dict`), so either format loads into any layout: a run saved
by 2 FSDP ranks resumes in one process and vice versa. A checkpoint is built in
`step-XXXXXXXX.tmp`, flushed, described by its manifest, then renamed: it exists complete or not
at all. Each rank computes the checksums of the files it wrote (rank 0 gathers them into the
manifest), and a load verifies several files at once. Nothing is unpickled from a file Kiln
did not write.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Set as AbstractSet
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kiln.errors import CheckpointError
from kiln.fileio import fsync_path, sha256_files
from kiln.parallel.runtime import Parallel
from kiln.parallel.tensors import plain_name as _clean
from kiln.train import lowbit

FORMAT = "kiln-checkpoint-2"
PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (`step-00000100` -> 100)."""
    return int(Path(path).name[len(PREFIX) :])


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


_RANK_FILE = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|rng-(\d+)\.safetensors)$")


def file_owner(name: str, world: int) -> int:
    """The rank that wrote checkpoint file `name` (a path relative to the checkpoint): a DCP
    shard's or an RNG file's rank; rank 0 for the rest (state, DCP metadata, single-process files)."""
    m = _RANK_FILE.search(name)
    rank = int(m.group(1) or m.group(2)) if m else 0
    return rank if rank < world else 0


# --------------------------------------------------------------------------- RNG


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors


def host_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # legacy=True (the default): the Mersenne Twister's state tuple
    py_version, py_state, py_gauss = random.getstate()
    return {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    # by device index, numerically: as strings "cuda.10" sorts before "cuda.2"
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# --------------------------------------------------------------------------- state dicts


def model_state(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(cast(dict[str, torch.Tensor], get_model_state_dict(part)))  # a model's: tensors only
    return out


def optimizer_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, dict[str, Any]]:
    """Optimizer state keyed by parameter name (hyper-parameters come from the config on resume)."""
    out: dict[str, dict[str, Any]] = {}
    for part, opt in zip(parts, optimizers):
        out.update(cast(dict[str, dict[str, Any]], get_optimizer_state_dict(part, opt)["state"]))
    return out


def _save_optimizer(state: dict[str, dict[str, Any]], path: Path) -> None:
    flat: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, s in state.items():
        for k, v in s.items():
            lowbit.flatten_state(f"{name}/{k}", v, flat, meta)
    save_file(flat, path, metadata=meta or None)


def _load_optimizer(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    flat = lowbit.unflatten_states(load_file(path), meta)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    return state


def forget_optimizer_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], names: set[str]) -> None:
    """Drop the optimizer state of the parameters `names`: they start as a fresh parameter does."""
    for part, opt in zip(parts, optimizers):
        for name, param in part.named_parameters():
            if _clean(name) in names:
                opt.state.pop(param, None)


def _apply(
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, dict[str, Any]] | None,
    full: bool,
    new_tensors: AbstractSet[str] = frozenset(),
) -> None:
    """Load the state dicts into `parts`; parameters named in `new_tensors` may be missing from
    them (a fork added them) and keep their initial values."""
    expected = {k: v for part in parts for k, v in get_model_state_dict(part).items()}
    if full:  # a full checkpoint names every tensor of the model, in its full shape
        extra = sorted(set(model_sd) - set(expected))
        if extra and len(parts) == 1:
            raise CheckpointError(
                f"the checkpoint has parameters this model lacks ({', '.join(extra[:3])}); was the model shape changed?"
            )
        for name, value in expected.items():
            shape = tuple(getattr(value, "shape", ()))
            if name in model_sd and tuple(model_sd[name].shape) != shape:
                raise CheckpointError(
                    f"checkpoint tensor {name} has shape {tuple(model_sd[name].shape)} but the "
                    f"model expects {shape}; was the model shape changed?"
                )
    per_part: list[torch.optim.Optimizer | None] = [*optimizers] or [None] * len(parts)
    for part, opt in zip(parts, per_part):
        names = list(get_model_state_dict(part))  # a fixed order: loading runs one collective per tensor
        missing = [n for n in names if n not in model_sd and n not in new_tensors]
        if missing:
            raise CheckpointError(f"the checkpoint lacks parameters {missing[:3]}; was the model shape changed?")
        present: dict[str, Any] = {k: model_sd[k] for k in names if k in model_sd}
        options = StateDictOptions(full_state_dict=full, strict=len(present) == len(names))
        set_model_state_dict(part, present, options=options)
        if opt is not None and optim_sd is not None:
            current = get_optimizer_state_dict(part, opt)
            state: dict[str, Any] = {k: optim_sd[k] for k in current["state"] if k in optim_sd}
            set_optimizer_state_dict(
                part, opt, {"state": state, "param_groups": current["param_groups"]}, options=options
            )


# --------------------------------------------------------------------------- save


class Checkpointer:
    """Saves and loads checkpoints under one folder for one job (one process or many)."""

    def __init__(
        self, folder: Path, par: Parallel | None = None, keep: int = 0, async_save: bool = False, keep_every: int = 0
    ):
        self.folder = Path(folder)
        self.par = par
        self.keep = keep
        self.keep_every = keep_every
        self.async_save = async_save and par is not None and par.distributed
        self._pending: tuple[Future, Path, Path] | None = None
        self._group = None

    @property
    def _distributed(self) -> bool:
        return self.par is not None and self.par.distributed

    @property
    def _rank(self) -> int:
        return self.par.info.rank if self.par is not None else 0

    def _barrier(self) -> None:
        if self.par is not None:
            self.par.barrier()

    def _agree(self, error: BaseException | None) -> None:
        """Every rank learns whether any rank failed, and all raise together (no rank is left
        waiting in a collective the others have abandoned)."""
        failed = error is not None
        if self._distributed:
            flag = torch.tensor([1 if failed else 0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            failed = bool(flag.item())
        if failed:
            if isinstance(error, OSError):
                raise error
            raise OSError(f"{error}" if error is not None else "another rank failed to write its part")

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def save(
        self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], trainer_state: dict[str, Any]
    ) -> Path | None:
        """Write checkpoint `step`; returns its path once committed, or None while an asynchronous
        save is still being written (`poll` / `wait` commit it). A write failure on any rank
        raises OSError on every rank and leaves earlier checkpoints untouched."""
        self.wait()
        final = self.folder / step_dir_name(step)
        tmp = self.folder / (final.name + ".tmp")
        error: BaseException | None = None
        try:
            if self._rank == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        except OSError as e:
            error = e
        self._agree(error)
        try:
            model_sd = model_state(parts)
            optim_sd = optimizer_state(parts, optimizers)
            try:
                save_file(rng_tensors(), tmp / f"rng-{self._rank}.safetensors")
                if self._rank == 0:
                    state = {
                        "step": step,
                        "trainer": trainer_state,
                        "rng": host_rng_state(),
                        "world_size": self.par.info.world_size if self.par else 1,
                    }
                    (tmp / "state.json").write_text(json.dumps(state))
            except OSError as e:
                error = e
            self._agree(error)
            if self._distributed:
                payload = {"model": model_sd, "optim": optim_sd}
                if self.async_save:
                    if self._group is None:  # the background writer's collectives get a group of their own
                        self._group = torch.distributed.new_group(backend="gloo")
                    future = dcp.async_save(payload, checkpoint_id=str(tmp / "dcp"), process_group=self._group)
                    assert isinstance(future, Future)  # no async_stager given: a plain future, not AsyncSaveResponse
                    self._pending = (future, tmp, final)
                    return None
                try:
                    dcp.save(payload, checkpoint_id=str(tmp / "dcp"))
                except CheckpointException as e:  # raised on every rank when any rank's write failed
                    raise OSError(f"distributed checkpoint write failed: {e}") from None
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, tmp / "model.safetensors")
                _save_optimizer(optim_sd, tmp / "optimizer.safetensors")
            self._commit(tmp, final, step)
        except BaseException:
            if self._rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def poll(self) -> Path | None:
        """Commit a pending asynchronous save if every rank has finished writing it (no waiting);
        returns the committed path, else None. Every rank must call it at the same steps."""
        if self._pending is None:
            return None
        done = self._pending[0].done()
        if self._distributed:
            flag = torch.tensor([1 if done else 0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            done = bool(flag.item())
        return self.wait() if done else None

    def wait(self) -> Path | None:
        """Finish a pending asynchronous save and commit it; returns its path (None if there was
        none). A failed write raises OSError on every rank."""
        if self._pending is None:
            return None
        future, tmp, final = self._pending
        self._pending = None
        error: BaseException | None = None
        try:
            future.result()
        except CheckpointException as e:
            error = OSError(f"distributed checkpoint write failed: {e}")
        except OSError as e:
            error = e
        try:
            self._agree(error)
        except BaseException:
            if self._rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._commit(tmp, final, checkpoint_step(final))
        return final

    def _describe_share(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """Flush and hash the files this rank wrote (its DCP shards `__<rank>_N.distcp`, its
        `rng-<rank>.safetensors`; rank 0 also the shared ones), several files at once: no rank
        reads back another's files."""
        world = self.par.info.world_size if self._distributed and self.par is not None else 1
        mine = [f for f in _files(tmp) if file_owner(str(f.relative_to(tmp)), world) == self._rank]
        for f in mine:
            fsync_path(f)
        digests = sha256_files(mine)
        return {str(f.relative_to(tmp)): {"sha256": d, "bytes": f.stat().st_size} for f, d in zip(mine, digests)}

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        self._barrier()  # every rank's files are on disk
        error: BaseException | None = None
        # Every rank hashes a share of the files (a checkpoint of a large model is terabytes: one
        # rank reading back what all ranks wrote took as long as the write many times over).
        entries: dict[str, dict[str, Any]] = {}
        try:
            entries = self._describe_share(tmp)
        except OSError as e:
            error = e
        self._agree(error)
        if self._distributed:
            shares: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.gather_object(entries, shares if self._rank == 0 else None, dst=0)
            if self._rank == 0:
                entries = {name: meta for share in shares for name, meta in share.items()}
        if self._rank == 0:
            try:
                manifest = {"format": FORMAT, "files": dict(sorted(entries.items()))}
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
                fsync_path(tmp / "manifest.json")
                old = None
                if final.exists():  # re-saving a step (e.g. after a rollback): keep the old copy until the new is in
                    old = final.with_name(final.name + ".old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(final, old)
                os.rename(tmp, final)
                fsync_path(self.folder)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                self._retain(step)
            except OSError as e:
                error = e
        self._agree(error)

    def _retain(self, current: int) -> None:
        """Keep the newest `keep` checkpoints up to `current` plus every `keep_every`-th step;
        runs only after a newer checkpoint is committed, so the last valid one is never deleted
        first. Folders past `current` (left by a run resumed from an earlier step) are not
        counted as newer and are left alone."""
        if not self.keep:
            return
        upto = [p for p in list_checkpoints(self.folder) if checkpoint_step(p) <= current]
        for old in upto[: -self.keep]:
            step = checkpoint_step(old)
            if not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)

    # ----------------------------------------------------------------------- load
    def load(
        self,
        path: Path,
        parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer] | None,
        rng_seed: int | None = None,
        new_tensors: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Restore model, optimizer and RNG from `path` into any layout; returns the saved state.
        A rank whose RNG state the checkpoint lacks (saved at a smaller world size) is seeded
        with `rng_seed` instead of copying another rank's (which would share its dropout masks).
        Parameters in `new_tensors` that the checkpoint lacks keep their initial values and
        start with no optimizer state."""
        load_weights(path, parts, optimizers, new_tensors)
        state = read_state(path)
        rng_file = path / f"rng-{self._rank}.safetensors"
        if rng_file.is_file():
            set_rng_state(load_file(rng_file), state["rng"])
        else:
            set_rng_state(load_file(path / "rng-0.safetensors"), state["rng"])  # host RNGs, CUDA layout
            if rng_seed is not None:
                torch.manual_seed(rng_seed)
        return state


def load_weights(
    path: Path,
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer] | None = None,
    new_tensors: tuple[str, ...] | set[str] = (),
) -> None:
    """Load model (and optimizer) state from either format into `parts`, whatever their layout.
    Parameters in `new_tensors` may be absent from the checkpoint (see `Checkpointer.load`)."""
    allowed = set(new_tensors)
    if (path / "dcp").is_dir():
        model_sd = model_state(parts)
        payload: dict[str, Any] = {"model": model_sd}
        if optimizers:
            payload["optim"] = optimizer_state(parts, optimizers)
        absent: set[str] = set()
        planner = None
        if allowed:
            saved = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
            absent = {k for k in model_sd if f"model.{k}" not in saved}
            planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
        if absent - allowed:
            raise CheckpointError(
                f"the checkpoint lacks parameters {sorted(absent - allowed)[:3]}; was the model shape changed?"
            )
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(payload, checkpoint_id=str(path / "dcp"), planner=planner)
        _apply(parts, optimizers or [], payload["model"], payload.get("optim"), full=False, new_tensors=absent)
    else:
        model_sd = load_file(path / "model.safetensors")
        optim_sd = _load_optimizer(path / "optimizer.safetensors") if optimizers else None
        absent = {_clean(n) for part in parts for n, _ in part.named_parameters()} - set(model_sd)
        _apply(parts, optimizers or [], model_sd, optim_sd, full=True, new_tensors=allowed & absent)
    if optimizers and allowed:
        forget_optimizer_state(parts, optimizers, allowed & absent)


def tensor_names(path: Path) -> set[str]:
    """The model tensors a checkpoint holds (either format), without loading them."""
    if (path / "dcp").is_dir():
        saved = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
        return {k[len("model.") :] for k in saved if k.startswith("model.")}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def list_checkpoints(folder: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first (temporary ones are ignored)."""
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def verify_checkpoint(path: Path) -> str | None:
    """None if `path` is complete and every checksum matches, else what is wrong."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "unreadable manifest"
    if manifest.get("format") != FORMAT:
        return f"unknown format {manifest.get('format')!r}"
    files = manifest["files"]
    for name, meta in files.items():  # the cheap checks first
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{name} does not match its checksum"
    digests = sha256_files([path / name for name in files])  # several files at once
    for (name, meta), digest in zip(files.items(), digests):
        if digest != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(folder: Path, warn=print, max_step: int | None = None) -> Path | None:
    """The newest checkpoint (at most `max_step`) that verifies; corrupt newer ones are
    reported and skipped."""
    for path in reversed(list_checkpoints(folder)):
        if max_step is not None and checkpoint_step(path) > max_step:
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"warning: checkpoint {path} is unusable ({problem}); trying the previous one")
    return None


def export_safetensors(path: Path, model: nn.Module, out: Path) -> Path:
    """Consolidate a checkpoint (either format) into one safetensors file of full weights."""
    load_weights(path, [model])
    return write_safetensors(model, out)


def write_safetensors(model: nn.Module, out: Path) -> Path:
    """The model's full weights as one safetensors file, written atomically."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out)
    return out
