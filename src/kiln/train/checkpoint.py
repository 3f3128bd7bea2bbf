"""Checkpoints: written atomically, verified by checksums, loadable at any world size.

    checkpoints/step-00000100/
        model.safetensors       single process: full weights, keyed by parameter name
        optimizer.safetensors   single process: optimizer state, keyed "<parameter name>/<state>"
        dcp/                    distributed: torch.distributed.checkpoint shards (model + optimizer)
        rng-<rank>.safetensors  torch (and CUDA) generator states of each rank
        state.json              step, trainer state, python/numpy RNG
        manifest.json           checksum (xxh3_128) and size of every file above; written last (the commit marker)

State dicts are keyed by parameter name in both formats (through
`torch.distributed.checkpoint.state_dict`), so either format loads into any layout: a run saved
by 2 FSDP ranks resumes in one process and vice versa. A checkpoint is built in
`step-XXXXXXXX.tmp`, flushed, described by its manifest, then renamed: it exists complete or not
at all. Each rank flushes and hashes the files it wrote, each file as soon as it is written and
while the disk is still taking it (rank 0 gathers the checksums into the manifest); an
asynchronous save does all of it in the background. A load by one process verifies every file;
under several, each rank verifies the files it will read (and those no rank reads are shared
out), and all ranks agree before anything is loaded. Nothing is unpickled from a file Kiln did
not write or that failed its checksum.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from kiln.errors import CheckpointError
from kiln.fileio import FlushAndHash, atomic_path, checksum_files, fsync_path, recorded_checksum
from kiln.parallel.runtime import Parallel
from kiln.parallel.tensors import plain_name as _clean
from kiln.train import lowbit
from kiln.train.checkpoint_writer import SplitWriter

FORMAT = "kiln-checkpoint-3"  # entries name their checksum ({"xxh3_128": ...})
READABLE = (FORMAT, "kiln-checkpoint-2")  # 2: every entry a sha256
PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (`step-00000100` -> 100)."""
    return int(Path(path).name[len(PREFIX) :])


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


_RANK_FILE = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|rng-(\d+)\.safetensors)$")


def _writer(name: str) -> int:
    """The rank a checkpoint file's name says wrote it (0 for the shared files)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def file_owner(name: str, world: int) -> int:
    """The rank that wrote checkpoint file `name` (a path relative to the checkpoint): a DCP
    shard's or an RNG file's rank; rank 0 for the rest (state, DCP metadata, single-process files)."""
    rank = _writer(name)
    return rank if rank < world else 0


def verification_share(names: Iterable[str], reads: list[set[str]], rank: int) -> set[str]:
    """What `rank` verifies at a load of `world = len(reads)` ranks: the files it reads, plus its
    share of the files no rank reads (by their writer's rank, modulo the world size), so every
    file is verified by some rank."""
    world = len(reads)
    read_by_some = set().union(*reads)
    unread = {n for n in names if n not in read_by_some}
    return set(reads[rank]) | {n for n in unread if _writer(n) % world == rank}


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


@dataclass
class SaveStats:
    """What one committed save cost: rank 0's clock; hashing is the slowest rank's."""

    step: int
    started: float = field(default_factory=time.perf_counter)
    bytes: int = 0  # every file of the checkpoint, every rank's
    seconds: float = 0.0  # from the save call to the commit
    gather_seconds: float = 0.0  # collecting the state dicts
    write_seconds: float = 0.0  # serialising and writing the files (asynchronous: in the background, staging included)
    hash_seconds: float = 0.0  # hashing that outlasted writing and flushing: what checksums added to the save
    blocking_seconds: float = 0.0  # the training loop held (asynchronous: what staging outlasted, and any wait)
    staging_seconds: float = 0.0  # asynchronous: from the save call until its host copy was made

    def event(self) -> dict[str, Any]:
        """The `events.jsonl` record of the committed save."""
        return {
            "kind": "checkpoint",
            "step": self.step,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "hash_seconds": round(self.hash_seconds, 3),
            "blocking_seconds": round(self.blocking_seconds, 3),
        }


@dataclass
class _Share:
    """One rank's files of a checkpoint, described: {name: {<checksum>, "bytes"}}."""

    files: dict[str, dict[str, Any]]
    hash_seconds: float


class UnusableCheckpoint(CheckpointError):
    """A file some rank was to read failed its check; raised on every rank, before anything is loaded."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} is unusable ({problem})")
        self.path, self.problem = path, problem


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
        self._pending: tuple[Future[None], Path, Path, SaveStats] | None = None
        self._group = None
        self._background: ThreadPoolExecutor | None = None  # flushes, hashes, commits asynchronous saves
        self._stager: DefaultStager | None = None  # an asynchronous save's host copy, kept for the next one
        self._staging: Future[None] | None = None  # that copy, while it is being made
        self.last_save: SaveStats | None = None  # the newest committed save's costs

    @property
    def _distributed(self) -> bool:
        return self.par is not None and self.par.distributed

    @property
    def _rank(self) -> int:
        return self.par.info.rank if self.par is not None else 0

    @property
    def _world(self) -> int:
        return self.par.info.world_size if self._distributed and self.par is not None else 1

    def _agree(self, error: BaseException | None, group: Any = None) -> None:
        """Every rank learns whether any rank failed, and all raise together (no rank is left
        waiting in a collective the others have abandoned)."""
        failed = error is not None
        if self._distributed:
            flag = torch.tensor([1 if failed else 0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
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
        stats = SaveStats(step)
        final = self.folder / step_dir_name(step)
        tmp = self.folder / (final.name + ".tmp")
        self._make_folder(tmp)
        # Each file is flushed and hashed as soon as it is written (fsync_path looked up now: a test wraps it).
        files: FlushAndHash | None = FlushAndHash(fsync_path)
        assert files is not None
        try:
            model_sd = model_state(parts)
            optim_sd = optimizer_state(parts, optimizers)
            stats.gather_seconds = time.perf_counter() - stats.started
            self._write_rng_and_state(tmp, step, trainer_state)
            written = time.perf_counter()
            if self._distributed:
                payload = {"model": model_sd, "optim": optim_sd}
                writer = SplitWriter(str(tmp / "dcp"), sync_files=False)  # flushed with the checksums
                if self.async_save:
                    self._start_async(payload, writer, files, tmp, final, stats, written)
                    files = None  # the background owns it now
                    return None
                try:
                    dcp.save(payload, storage_writer=writer)
                except CheckpointException as e:  # raised on every rank when any rank's write failed
                    raise OSError(f"distributed checkpoint write failed: {e}") from None
            else:
                # the larger file first: its checksum is taken while the other is written
                _save_optimizer(optim_sd, tmp / "optimizer.safetensors")
                files.add(tmp / "optimizer.safetensors")
                save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, tmp / "model.safetensors")
            stats.write_seconds = time.perf_counter() - written
            ready = files
            self._commit(tmp, final, stats, lambda: self._describe(tmp, ready))
            stats.blocking_seconds = stats.seconds
            self.last_save = stats
        except BaseException:
            if self._rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if files is not None:
                files.close()
        return final

    def _make_folder(self, tmp: Path) -> None:
        """Rank 0 makes the checkpoint's build folder `tmp` afresh; every rank learns if it failed."""
        error: BaseException | None = None
        try:
            if self._rank == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        except OSError as e:
            error = e
        self._agree(error)

    def _write_rng_and_state(self, tmp: Path, step: int, trainer_state: dict[str, Any]) -> None:
        """This rank's generator states, and (rank 0) state.json; a write failure on any rank
        raises on every rank."""
        error: BaseException | None = None
        try:
            save_file(rng_tensors(), tmp / f"rng-{self._rank}.safetensors")
            if self._rank == 0:
                state = {
                    "step": step,
                    "trainer": trainer_state,
                    "rng": host_rng_state(),
                    "world_size": self._world,
                }
                (tmp / "state.json").write_text(json.dumps(state))
        except OSError as e:
            error = e
        self._agree(error)

    def _start_async(
        self,
        payload: dict[str, Any],
        writer: SplitWriter,
        files: FlushAndHash,
        tmp: Path,
        final: Path,
        stats: SaveStats,
        written: float,
    ) -> None:
        """Start an asynchronous distributed save: stage the state to the host, hand the write,
        flush, hashing and commit (and `files`) to the background, and leave it pending."""
        if self._group is None:  # the background writer's collectives get a group of their own
            self._group = torch.distributed.new_group(backend="gloo")
        if self._stager is None:
            # The host copy is made on a thread of its own (a copy stream on a GPU) while the next
            # step's forward and backward run: only its update changes what is copied, and the
            # loop calls `staged()` before it. The copy's buffers (pinned on a GPU) are kept:
            # allocating gigabytes anew each save (page faults on every byte) held the step for seconds.
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(cuda, False, True, cuda))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copy stream must see the last update's kernels finished
        response = dcp.async_save(payload, storage_writer=writer, process_group=self._group, async_stager=self._stager)
        assert isinstance(response, AsyncSaveResponse)  # asynchronous staging: two futures
        self._staging = response.staging_completion
        copied = lambda _: setattr(stats, "staging_seconds", time.perf_counter() - stats.started)  # noqa: E731
        self._staging.add_done_callback(copied)
        future = response.upload_completion
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-ckpt")
        done = self._background.submit(self._finish_async, future, files, tmp, final, stats, written)
        stats.blocking_seconds = time.perf_counter() - stats.started
        self._pending = (done, tmp, final, stats)

    def _finish_async(
        self, future: Future, files: FlushAndHash, tmp: Path, final: Path, stats: SaveStats, written: float
    ) -> None:
        """In the background, over the save's own process group: wait for this rank's write,
        flush and hash its files, and commit the checkpoint with the other ranks (a failure
        raises the same OSError in every rank's future)."""

        def describe() -> _Share:
            try:
                future.result()
                stats.write_seconds = time.perf_counter() - written
                return self._describe(tmp, files)
            except CheckpointException as e:  # raised on every rank when any rank's write failed
                raise OSError(f"distributed checkpoint write failed: {e}") from None
            finally:
                files.close()

        try:
            self._commit(tmp, final, stats, describe, self._group)
        except BaseException:
            if self._rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def staged(self) -> None:
        """Wait until a pending asynchronous save's host copy is made (the loop calls this before
        an update changes the weights or the optimizer's state); the wait counts as held."""
        staging, self._staging = self._staging, None
        if staging is None or self._pending is None:
            return
        held = time.perf_counter()
        with contextlib.suppress(Exception):  # the same failure reaches every rank through `wait`
            staging.result()
        self._pending[3].blocking_seconds += time.perf_counter() - held

    def poll(self) -> Path | None:
        """The path of a pending asynchronous save once every rank's background has committed it
        (no waiting), else None. Every rank must call it at the same steps."""
        if self._pending is None:
            return None
        done = self._pending[0].done()
        if self._distributed:
            flag = torch.tensor([1 if done else 0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            done = bool(flag.item())
        return self.wait() if done else None

    def wait(self) -> Path | None:
        """Wait for a pending asynchronous save to be committed; returns its path (None if there
        was none). A failed write raises OSError on every rank."""
        if self._pending is None:
            return None
        done, tmp, final, stats = self._pending
        self._pending, self._staging = None, None
        held = time.perf_counter()
        try:
            done.result()  # committed in the background, or the OSError every rank's raises
        finally:
            stats.blocking_seconds += time.perf_counter() - held  # the loop waited for the background
        # (a wait that outlasted the commit by the moment it took to return held nothing more)
        stats.blocking_seconds = min(stats.blocking_seconds, stats.seconds)
        self.last_save = stats
        return final

    def _describe(self, tmp: Path, files: FlushAndHash) -> _Share:
        """Flush and hash the files this rank wrote (its DCP shards `__<rank>_N.distcp`, its
        `rng-<rank>.safetensors`; rank 0 also the shared ones), those not started yet included:
        no rank reads back another's files. Each is hashed from the page cache while the disk
        takes it (measured against hashing as the bytes are written, which made the writes wait
        for the hash: slower wherever flushing takes time)."""
        mine = [f for f in _files(tmp) if file_owner(str(f.relative_to(tmp)), self._world) == self._rank]
        for f in mine:
            if f not in files:
                files.add(f)
        digests, hash_seconds = files.finish()
        described = {
            str(f.relative_to(tmp)): {files.algorithm: digests[f], "bytes": f.stat().st_size}
            for f in mine
            if f in digests
        }
        return _Share(described, hash_seconds)

    def _commit(
        self, tmp: Path, final: Path, stats: SaveStats, describe: Callable[[], _Share], group: Any = None
    ) -> None:
        """Gather every rank's described files into the manifest (rank 0), write it last and
        rename the folder into place; collectives over `group` (None: the default one)."""
        error: BaseException | None = None
        # Every rank describes its own files (a checkpoint of a large model is terabytes: one rank
        # reading back what all ranks wrote took as long as the write many times over).
        share = _Share({}, 0.0)
        try:
            share = describe()
        except OSError as e:
            error = e
        self._agree(error, group)
        entries, stats.hash_seconds = share.files, share.hash_seconds
        if self._distributed:
            shares: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.gather_object(
                (share.files, share.hash_seconds), shares if self._rank == 0 else None, dst=0, group=group
            )
            if self._rank == 0:
                entries = {name: meta for files, _ in shares for name, meta in files.items()}
                stats.hash_seconds = max(seconds for _, seconds in shares)
        if self._rank == 0:
            try:
                manifest = {"format": FORMAT, "files": dict(sorted(entries.items()))}
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
                fsync_path(tmp / "manifest.json")
                for folder in sorted({f.parent for f in _files(tmp)}):  # the new files' directory entries
                    fsync_path(folder)
                old = None
                if final.exists():  # re-saving a step (e.g. after a rollback): keep the old copy until the new is in
                    old = final.with_name(final.name + ".old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(final, old)
                os.rename(tmp, final)
                fsync_path(self.folder)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                self._retain(stats.step)
                stats.bytes = sum(meta["bytes"] for meta in entries.values())
            except OSError as e:
                error = e
        self._agree(error, group)
        stats.seconds = time.perf_counter() - stats.started

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
        start with no optimizer state. Under several ranks each verifies the files it reads
        first; a damaged one raises UnusableCheckpoint on every rank, with nothing loaded."""
        self.staged()  # loading overwrites what a pending save may still be copying
        rng_file = path / f"rng-{self._rank}.safetensors"
        if not rng_file.is_file():
            rng_file = path / "rng-0.safetensors"  # host RNGs, CUDA layout
        check = None
        if self._distributed:
            # first what the plan is made from (the DCP metadata is a pickle), then the data files
            small = {"state.json", rng_file.name} | ({"dcp/.metadata"} if (path / "dcp").is_dir() else set())
            self._verify_reads(path, small, share_unread=False)
            check = lambda reads: self._verify_reads(path, reads | small, verified=small)  # noqa: E731
        load_weights(path, parts, optimizers, new_tensors, before_reading=check)
        state = read_state(path)
        set_rng_state(load_file(rng_file), state["rng"])
        if rng_file.name != f"rng-{self._rank}.safetensors" and rng_seed is not None:
            torch.manual_seed(rng_seed)
        return state

    def _verify_reads(
        self, path: Path, reads: set[str], verified: AbstractSet[str] = frozenset(), share_unread: bool = True
    ) -> None:
        """Each rank verifies `reads` (the checkpoint files it will read; those in `verified`
        are done already) and, with `share_unread`, its share of the files no rank reads; every
        rank then raises the same UnusableCheckpoint if any rank found a problem. Collective."""
        files, problem = _manifest_files(path)
        world = torch.distributed.get_world_size()
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, (sorted(reads), problem))
        problem = next((p for _, p in gathered if p), None)
        if problem is None:
            mine = reads
            if share_unread:
                mine = verification_share(files, [set(r) for r, _ in gathered], self._rank)
            problem = check_files(path, files, sorted(mine - verified))
            problems: list[Any] = [None] * world
            torch.distributed.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), None)
        if problem is not None:
            raise UnusableCheckpoint(path, problem)

    def fallback(self, unusable: UnusableCheckpoint, warn: Callable[[str], None] = print) -> Path:
        """The checkpoint to load instead of one a rank found damaged at load: the newest valid
        one before it (rank 0 chooses for every rank), provided it was saved by the same kind of
        run (the trainer was built for the damaged one's precision and data order)."""
        path, problem = unusable.path, unusable.problem
        warn(f"warning: checkpoint {path} is unusable ({problem}); trying the previous one")
        assert self.par is not None  # only a distributed load verifies at load
        previous = newest_checkpoint(path.parent, self.par, warn, max_step=checkpoint_step(path) - 1)
        if previous is None:
            raise CheckpointError(
                f"checkpoint {path} is unusable ({problem}) and no earlier checkpoint is valid; "
                "move it aside to start the run again from step 0"
            )
        was, now = read_state(path)["trainer"], read_state(previous)["trainer"]
        for key in ("precision", "order", "data_key"):
            if was.get(key) != now.get(key):
                raise CheckpointError(
                    f"checkpoint {path} is unusable ({problem}) and the previous one, {previous.name}, was saved "
                    f"with another {key}; move {path.name} aside and resume again"
                )
        return previous


def _dcp_reads(folder: Path, payload: dict[str, Any], metadata: Any, partial: bool) -> set[str]:
    """The DCP files this rank's load of `payload` will read (relative to the checkpoint): its
    load plan's items and where the metadata stores them (under resharding, pieces of several
    ranks' files; the same layout, its own)."""
    planner = dcp.DefaultLoadPlanner(allow_partial_load=partial)
    planner.set_up_planner(dict(payload), metadata, is_coordinator=False)  # a copy: planning rebinds its keys
    storage = metadata.storage_data
    return {f"{folder.name}/{storage[item.storage_index].relative_path}" for item in planner.create_local_plan().items}


def load_weights(
    path: Path,
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer] | None = None,
    new_tensors: tuple[str, ...] | set[str] = (),
    before_reading: Callable[[set[str]], None] | None = None,
) -> None:
    """Load model (and optimizer) state from either format into `parts`, whatever their layout.
    Parameters in `new_tensors` may be absent from the checkpoint (see `Checkpointer.load`).
    `before_reading(names)` is called with the checkpoint files this load will read (relative
    to `path`) before any of their data is read (the DCP metadata is read to plan it)."""
    allowed = set(new_tensors)
    if (path / "dcp").is_dir():
        model_sd = model_state(parts)
        payload: dict[str, Any] = {"model": model_sd}
        if optimizers:
            payload["optim"] = optimizer_state(parts, optimizers)
        absent: set[str] = set()
        planner = None
        metadata = None
        if allowed or before_reading is not None:
            metadata = dcp.FileSystemReader(str(path / "dcp")).read_metadata()
        if allowed:
            assert metadata is not None
            absent = {k for k in model_sd if f"model.{k}" not in metadata.state_dict_metadata}
            planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
        if absent - allowed:
            raise CheckpointError(
                f"the checkpoint lacks parameters {sorted(absent - allowed)[:3]}; was the model shape changed?"
            )
        if before_reading is not None:
            before_reading(_dcp_reads(path / "dcp", payload, metadata, partial=bool(allowed)))
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(payload, checkpoint_id=str(path / "dcp"), planner=planner)
        _apply(parts, optimizers or [], payload["model"], payload.get("optim"), full=False, new_tensors=absent)
    else:
        if before_reading is not None:
            before_reading({"model.safetensors", *(["optimizer.safetensors"] if optimizers else [])})
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


def _manifest_files(path: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The manifest's {name: {<checksum>, "bytes"}}, or what is wrong with the manifest."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return {}, "no manifest (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return {}, "unreadable manifest"
    if manifest.get("format") not in READABLE:
        return {}, f"unknown format {manifest.get('format')!r}"
    return manifest["files"], None


def check_files(path: Path, files: dict[str, dict[str, Any]], names: list[str], hashed: bool = True) -> str | None:
    """None if each of `names` is on disk as the manifest `files` describes it, else the first
    problem: every size first (cheap), then (`hashed`) every checksum, several files at once."""
    for name in names:
        if name not in files:
            return f"{name} is not in the manifest"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != files[name]["bytes"]:
            return f"{name} does not match its checksum"
    if hashed:
        try:
            recorded = [recorded_checksum(files[name]) for name in names]
        except ValueError as e:
            return f"unreadable manifest: {e}"
        found = checksum_files([path / name for name in names], [algorithm for algorithm, _ in recorded])
        for name, (_, digest), got in zip(names, recorded, found):
            if got != digest:
                return f"{name} does not match its checksum"
    return None


def verify_checkpoint(path: Path, deep: bool = True) -> str | None:
    """None if `path` is complete and every checksum matches, else what is wrong. Not `deep`:
    the manifest, every file's presence and size, and the checksum of state.json only (what
    choosing a checkpoint reads; the loading ranks verify the rest)."""
    files, problem = _manifest_files(path)
    if problem is not None:
        return problem
    names = list(files)
    problem = check_files(path, files, names, hashed=deep)
    if problem is None and not deep and "state.json" in files:
        problem = check_files(path, files, ["state.json"])
    return problem


def latest_valid_checkpoint(folder: Path, warn=print, max_step: int | None = None, deep: bool = True) -> Path | None:
    """The newest checkpoint (at most `max_step`) that verifies (`deep`: see verify_checkpoint);
    corrupt newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(folder)):
        if max_step is not None and checkpoint_step(path) > max_step:
            continue
        problem = verify_checkpoint(path, deep)
        if problem is None:
            return path
        warn(f"warning: checkpoint {path} is unusable ({problem}); trying the previous one")
    return None


def newest_checkpoint(folder: Path, par: Parallel, warn=print, max_step: int | None = None) -> Path | None:
    """The newest valid checkpoint (at most `max_step`), chosen by rank 0 for every rank. One
    process verifies every file here; under several, rank 0 checks the manifest, the sizes and
    state.json, and each rank verifies the files it reads when it loads (`Checkpointer.load`)."""
    deep = not par.distributed
    return par.broadcast(par.main_first(lambda: latest_valid_checkpoint(folder, warn, max_step, deep=deep)))


def export_safetensors(path: Path, model: nn.Module, out: Path) -> Path:
    """Consolidate a checkpoint (either format) into one safetensors file of full weights."""
    load_weights(path, [model])
    return write_safetensors(model, out)


def write_safetensors(model: nn.Module, out: Path) -> Path:
    """The model's full weights as one safetensors file, written atomically."""
    with atomic_path(out) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    return out
