"""`kiln fork`: the next attempt of an experiment, started from a checkpoint of the last one.

A fork is a new run folder whose first checkpoint is its parent's checkpoint at (or before) the
fork step, linked in unchanged, so training it is an ordinary resume: model, optimizer,
schedule position, RNG, data position, guard and callback states are what the parent had
there. On top come the changes:

- anything `--resume` may change (kiln.changes.RESUMABLE_SECTIONS / RESUMABLE_KEYS), plus
  dropout, `train.z_loss` and the stabilising architecture additions `model.qk_norm` and
  `model.post_norm` (FORKABLE_KEYS). Parameters these add are initialised by the family's rule
  (norm gains 1), start with no optimizer state, and are listed in the lineage;
- data batch ranges never to train on (`--skip-batches A:B`, inclusive, in the numbering of
  events.jsonl's `data_index`), which must lie after the batches already trained;
- with `--from-scratch`, any change at all: a fresh attempt (no checkpoint) with the parent's
  seed and data order unless changed.

`lineage.json` records the parent, the fork step, the checkpoint and its hash, every change as
given, the skipped ranges and the new tensors. Everything is checked before anything is
written, and a failure while writing removes the half-made fork, so a refused fork leaves no trace.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.changes import FORKABLE_KEYS, MIX_KEYS, changed_keys, mix_change_only, optimizer_layout_change, resumable
from kiln.config import Config, load_config
from kiln.errors import CheckpointError, ConfigError, KilnError
from kiln.runs.rundir import RunDir
from kiln.train import checkpoint as ckpt

ARCHITECTURE_FLAGS = ("model.qk_norm", "model.post_norm")  # may be switched on, never off


@dataclass
class Fork:
    run: RunDir
    lineage: dict[str, Any]
    checkpoint: Path | None  # the parent's checkpoint it starts from (None: from scratch)


def parse_skip_ranges(values: list[str]) -> list[list[int]]:
    """`A:B` strings -> sorted, merged [A, B] ranges (inclusive)."""
    from kiln.data.skips import add_range

    ranges: list[list[int]] = []
    for text in values:
        lo, sep, hi = text.partition(":")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
            raise ConfigError(
                f"--skip-batches takes A:B, two data batch indices with A <= B (both skipped, as in "
                f"events.jsonl's data_index), got {text!r}"
            )
        ranges = add_range(ranges, int(lo), int(hi))
    return ranges


def _refuse_changes(changes: dict[str, tuple[Any, Any]]) -> None:
    for key, (old, new) in changes.items():
        why = optimizer_layout_change(key, old, new)
        if why:
            raise ConfigError(
                f"{why}; a fork of a checkpoint may change a group's lr, lr_mult, weight_decay and betas; "
                "use --from-scratch to start a fresh attempt with another optimizer layout"
            )
        if key in ARCHITECTURE_FLAGS and old and not new:
            raise ConfigError(
                f"{key} cannot be switched off in a fork of a checkpoint (its trained weights would be "
                "dropped); use --from-scratch to start a fresh attempt without it"
            )
        if not (resumable(key) or key in FORKABLE_KEYS or mix_change_only(key, old, new)):
            raise ConfigError(
                f"{key} cannot change in a fork of a checkpoint ({old!r} -> {new!r}): the checkpoint's "
                "model, data or objective would not fit; use --from-scratch to start a fresh attempt "
                "with this change (same data order, lineage recorded)"
            )


def new_tensors(parent_cfg: Config, cfg: Config, vocab_size: int, saved: set[str]) -> list[str]:
    """Parameters the fork's model has and the checkpoint (tensor names `saved`) lacks; the
    models of both configs are built on the meta device to check that the shapes agree."""
    import torch

    from kiln.model.registry import build_model

    with torch.device("meta"):
        old = {k: tuple(v.shape) for k, v in build_model(parent_cfg.model, vocab_size).state_dict().items()}
        new = {k: tuple(v.shape) for k, v in build_model(cfg.model, vocab_size).state_dict().items()}
    for name, shape in new.items():
        if name in old and old[name] != shape:
            raise ConfigError(
                f"the fork's {name} has shape {shape} but the checkpoint's has {old[name]}; use "
                "--from-scratch for a change of shape"
            )
    gone = sorted(set(old) - set(new))
    if gone:
        raise ConfigError(f"the fork's model lacks the checkpoint's {', '.join(gone[:3])}; use --from-scratch")
    return sorted(set(new) - saved)  # a fork of a fork at its fork point inherits its new tensors


def checkpoint_hash(path: Path) -> str:
    """sha256 of the checkpoint's manifest, which holds the sha256 of every file in it."""
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of `src` made of hard links where the filesystem allows (checkpoints are never
    modified in place, so sharing their files is safe and free)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _trained_state(path: Path) -> dict[str, Any]:
    return ckpt.read_state(path)["trainer"]


def plan_fork(
    parent_path: Path,
    name: str,
    step: int | None,
    sets: list[str],
    skip: list[str],
    from_scratch: bool,
    runs_dir: Path | None = None,
    check: Callable[[Config], Any] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Config, dict[str, Any], Path | None, Path]:
    """Check everything a fork needs and return (config, lineage, parent checkpoint, new run
    folder) without writing anything."""
    from kiln.data.skips import data_index, skipped_ranges

    parent = RunDir.open(parent_path)
    if not name or "/" in name or name.startswith("."):
        raise KilnError(f"--name must be a plain folder name, got {name!r}")
    folder = Path(runs_dir) if runs_dir is not None else parent.path.parent
    target = folder / name
    if target.exists():
        raise KilnError(f"'{target}' already exists; choose another --name for the fork")
    if step is None and not from_scratch:
        raise KilnError("kiln fork needs --step N (the checkpoint to start from), or --from-scratch")
    if step is not None and step < 0:
        raise KilnError(f"--step must be >= 0, got {step}")
    ranges = parse_skip_ranges(skip)
    parent_cfg = parent.config()
    cfg = load_config(overrides=sets, base=parent.config_dict())
    changes = changed_keys(parent_cfg, cfg)
    if not from_scratch:
        _refuse_changes(changes)  # before the config's own checks: the fork's rule is the one that explains
    if check is not None:
        parent.check_family(cfg, check)
    lineage: dict[str, Any] = {
        "parent": {"run": parent.name, "path": str(parent.path.resolve()), "step": step},
        "from_scratch": from_scratch,
        "changes": list(sets),
        "changed": {k: [old, new] for k, (old, new) in changes.items()},
        "skip_batches": ranges,
        "new_tensors": [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if from_scratch:
        return cfg, lineage, None, target

    chosen = parent.latest_checkpoint(warn=log, max_step=step)
    if chosen is None:
        steps = ", ".join(str(ckpt.checkpoint_step(p)) for p in parent.checkpoint_paths()) or "none"
        raise CheckpointError(
            f"{parent.path} has no valid checkpoint at or before step {step} (checkpoints: {steps}); "
            "choose another --step, or --from-scratch"
        )
    state = _trained_state(chosen)
    at = ckpt.checkpoint_step(chosen)
    skipped = skipped_ranges(state)
    next_batch = data_index(at, skipped)
    for lo, hi in ranges:
        if lo < next_batch:
            raise ConfigError(
                f"--skip-batches {lo}:{hi} starts before the fork point: step {at} trains on data batch "
                f"{next_batch} next, and the batches before it were already trained on"
            )
    vocab = parent.tokenizer().vocab_size
    lineage["parent"].update(
        {
            "step": at,
            "checkpoint": chosen.name,
            "checkpoint_sha256": checkpoint_hash(chosen),
            "tokens": state.get("tokens"),
            "next_data_batch": next_batch,
        }
    )
    lineage["new_tensors"] = new_tensors(parent_cfg, cfg, vocab, ckpt.tensor_names(chosen))
    if any(k in changes for k in MIX_KEYS):
        lineage["mixture"] = forked_mix(cfg, state, next_batch)
    return cfg, lineage, chosen, target


def forked_mix(cfg: Config, state: dict[str, Any], next_batch: int) -> dict[str, Any]:
    """The fork's mix: its parent's eras up to the fork point, then the changed one."""
    from kiln.data.mixture_order import Era, era_from_config, mixture_fingerprint

    saved = state.get("mixture")
    if not saved:
        raise ConfigError("the parent's checkpoint records no mixture; use --from-scratch to train one")
    eras = [Era.from_json(e) for e in saved["eras"] if e["start"] < next_batch]
    eras.append(era_from_config(cfg.data, cfg.total_steps, start=next_batch))
    return {"fingerprint": mixture_fingerprint(cfg.data), "eras": [e.to_json() for e in eras]}


def create_fork(
    parent_path: Path,
    name: str,
    step: int | None,
    sets: Sequence[str] = (),
    skip: Sequence[str] = (),
    from_scratch: bool = False,
    runs_dir: Path | None = None,
    check: Callable[[Config], Any] | None = None,
    plugins: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Fork:
    """Make the fork's run folder (not trained yet: `kiln train --resume` trains it)."""
    cfg, lineage, chosen, target = plan_fork(
        parent_path, name, step, list(sets), list(skip), from_scratch, runs_dir, check, log
    )
    parent = RunDir(parent_path)
    meta_plugins = sorted(set(parent.meta().get("plugins") or []) | set(plugins))
    run = RunDir.create(target.parent, target.name, cfg, {"plugins": meta_plugins, "forked_from": parent.name})
    try:
        if chosen is not None:  # a fresh attempt makes its own tokenizer with its data (kiln train --resume)
            shutil.copy2(parent.tokenizer_path, run.tokenizer_path)
            run.checkpoints.mkdir()
            tmp = run.checkpoints / (chosen.name + ".tmp")
            _link_tree(chosen, tmp)
            os.rename(tmp, run.checkpoints / chosen.name)
        run.write_json("lineage.json", lineage)
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)
        raise
    if chosen is not None:
        log(
            f"fork {run.path} starts from {parent.path}/checkpoints/{chosen.name}"
            + (
                f" (the newest valid checkpoint at or before step {step})"
                if ckpt.checkpoint_step(chosen) != step
                else ""
            )
        )
    else:
        log(f"fork {run.path}: a fresh attempt with {parent.path}'s configuration and the changes")
    if lineage["new_tensors"]:
        log(
            f"  new tensors (initialised as documented, no optimizer state): {len(lineage['new_tensors'])}, e.g. "
            + ", ".join(lineage["new_tensors"][:3])
        )
    return Fork(run, lineage, chosen)
