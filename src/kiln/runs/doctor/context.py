"""What `kiln doctor` reads a run with: the `Context` (the run folder's files, read once through
RunDir; checkpoints verified once) and the remedies rules propose from it.

Remedies are `kiln fork` commands from the run's own verified checkpoints: the newest valid one
at or before the trouble, with the change the finding calls for (and the injected `[faults]`
switched off, so the fork tests the fix and not the fault again), checked as `kiln fork` checks
them before anything is written; `kiln train --resume RUN` for infrastructure faults.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.config import FAULT_TRIGGERS
from kiln.data.skips import add_range, data_index, skipped_ranges
from kiln.errors import KilnError
from kiln.runfolder.columns import INT, Table
from kiln.runs.doctor.findings import fmt_lr, median, toml_value
from kiln.runs.rundir import RunDir
from kiln.train import checkpoint as ckpt

if TYPE_CHECKING:
    from kiln.config import Config

SANE_LR = 1e-2  # AdamW peak LRs above this are far outside what transformers train with


def one_row_per_step(table: Table) -> Table:
    """The rows with an int step, the last of each step, in step order."""
    steps, kinds = table.column("step")
    rows = np.flatnonzero(kinds == INT)
    s = steps[rows]
    if len(rows) == table.rows and bool(np.all(s[1:] > s[:-1])):
        return table  # the usual log: nothing to drop or reorder
    _, first_from_end = np.unique(s[::-1], return_index=True)
    return table.take(rows[len(rows) - 1 - first_from_end])


class Context:
    """A run folder's files, read once; checkpoints verified on demand (each at most once).

    The metrics are a Table (kiln.runfolder.columns) with one row per step, the last one logged
    (after a rollback the file holds a step twice), in step order: rules read its columns as
    arrays. `metrics`, the same rows as dicts, is built only for a rule that asks for it (a
    plugin's, say): a long run's million dicts cost seconds and gigabytes."""

    def __init__(self, run: RunDir):
        self.run = run
        self.cfg: Config | None
        try:
            self.cfg = run.config()
        except KilnError:
            self.cfg = None
        self.table = one_row_per_step(run.metrics_table())
        self.steps = self.table.column("step")[0].astype(np.int64)
        self.events = run.events()
        self.evals = sorted((e for e in run.evals() if isinstance(e.get("step"), int)), key=lambda e: e["step"])
        self.layer_stats = run.read_jsonl(run.path / "layer_stats.jsonl")
        self.status = run.status()
        self.lineage = run.lineage() or {}
        self._verified: dict[Path, str | None] = {}
        self.cache: dict[str, Any] = {}  # rules share analyses through this (e.g. the divergence)

    @functools.cached_property
    def metrics(self) -> list[dict[str, Any]]:
        return self.table.records()

    @property
    def last_step(self) -> int | None:
        return int(self.steps[-1]) if len(self.steps) else None

    # ---------------------------------------------------------------- series
    def loss_points(self, finite_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(steps, losses) of the records whose loss is a number (a finite one)."""
        if not finite_only:  # the divergence's, read once (it is cached)
            keep = self.table.is_number("loss")
            return self.steps[keep], self.table.numbers("loss")[keep]
        if "loss_points" not in self.cache:
            keep = self.table.finite("loss")
            self.cache["loss_points"] = (self.steps[keep], self.table.numbers("loss")[keep])
        return self.cache["loss_points"]

    def losses(self, finite_only: bool = True) -> list[tuple[int, float]]:
        steps, values = self.loss_points(finite_only)
        return list(zip(steps.tolist(), values.tolist()))

    def train_loss_near(self, step: int, points: int = 5) -> float | None:
        steps, values = self.loss_points()
        end = int(np.searchsorted(steps, step, side="right"))
        near = values[max(0, end - points) : end].tolist()
        return median(near) if near else None

    warmup = property(lambda self: self.cfg.schedule.warmup_steps if self.cfg else 0)

    # ---------------------------------------------------------------- checkpoints and data batches
    def checkpoints(self) -> list[Path]:
        return self.run.checkpoint_paths()

    def problem(self, path: Path) -> str | None:
        if path not in self._verified:
            self._verified[path] = ckpt.verify_checkpoint(path)
        return self._verified[path]

    def fork_point(self, max_step: int) -> Path | None:
        """The newest checkpoint at or before `max_step` that verifies."""
        for path in reversed(self.checkpoints()):
            if ckpt.checkpoint_step(path) <= max_step and self.problem(path) is None:
                return path
        return None

    def skipped(self) -> list[list[int]]:
        """Every data batch range the run skips: the newest readable checkpoint's, the fork's,
        and the guard's rollbacks since."""
        if "skipped" in self.cache:
            return self.cache["skipped"]
        ranges: list[list[int]] = []
        for path in reversed(self.checkpoints()):
            try:
                state = ckpt.read_state(path)["trainer"]
            except (OSError, ValueError, KeyError):
                continue
            ranges = skipped_ranges(state)
            break
        extra = list(self.lineage.get("skip_batches", []))
        extra += [e["batches_skipped"] for e in self.events if e.get("kind") == "rollback" and e.get("batches_skipped")]
        for lo, hi in extra:
            ranges = add_range(ranges, int(lo), int(hi))
        self.cache["skipped"] = ranges
        return ranges

    def batch_of(self, step: int) -> int:
        """The data batch completed step `step` trained on (events.jsonl's data_index)."""
        return data_index(max(step - 1, 0), self.skipped())

    def next_batch(self, path: Path) -> int:
        state = ckpt.read_state(path)["trainer"]
        skipped = skipped_ranges(state)
        return data_index(ckpt.checkpoint_step(path), skipped)

    # ---------------------------------------------------------------- learning rate
    def schedule_factor(self, step: int) -> float | None:
        if self.cfg is None:
            return None
        from kiln.train.optim import lr_at

        f = lr_at(max(step - 1, 0), self.cfg.total_steps, 1.0, self.cfg.schedule)
        return f if f > 0 else None

    def effective_peak(self, step: int) -> float | None:
        """The peak LR the run was effectively using at `step` (the logged LR over the schedule's
        shape there): differs from optim.lr when something changed the LR while running."""
        rows = np.flatnonzero(self.table.finite("lr") & (self.steps <= step))
        if not len(rows):
            return None
        row = int(rows[-1])
        f = self.schedule_factor(int(self.steps[row]))
        return self.table.value("lr", row) / f if f else None

    def lower_lr(self, step: int) -> tuple[float, str]:
        """A lower peak LR for a fork before `step`: a third of what it ran with, or (far above a
        sane LR) a tenth, at most 3e-3."""
        cfg_lr = self.cfg.optim.lr if self.cfg else 1e-3
        eff = self.effective_peak(step)
        base = min(cfg_lr, eff) if eff else cfg_lr
        if base > SANE_LR:
            new = min(base / 10, SANE_LR / 3)
            how = f"a tenth of {fmt_lr(base)} (far above the usual <= {SANE_LR:g}), at most {fmt_lr(SANE_LR / 3)}"
        else:
            new = base / 3
            how = f"a third of {fmt_lr(base)}"
        return float(fmt_lr(new)), how

    # ---------------------------------------------------------------- remedies
    def faults_off(self) -> list[str]:
        """`--set` items that switch off faults the run injected on purpose ([faults])."""
        faults = getattr(self.cfg, "faults", None)
        if faults is None or not dataclasses.is_dataclass(faults):
            return []
        defaults = {
            f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(faults)
        }
        return [
            f"faults.{k}={toml_value(defaults[k])}"
            for k in FAULT_TRIGGERS
            if k in defaults and getattr(faults, k) != defaults[k]
        ]

    def fork_name(self, kind: str) -> str:
        base = f"{self.run.name}-{kind}"
        name, n = base, 2
        while (self.run.path.parent / name).exists():
            name, n = f"{base}-{n}", n + 1
        return name

    def fork_remedy(
        self, kind: str, max_step: int, sets: list[str], why: str, skip: Sequence[Sequence[int]] = ()
    ) -> dict[str, Any]:
        """`kiln fork RUN --step C --name RUN-kind --set ... --skip-batches A:B` from the newest
        valid checkpoint C <= max_step (from scratch when there is none), checked as `kiln fork`
        would check it before anything is written."""
        from kiln.config import load_config
        from kiln.runs import fork as forking  # the fork's own rules (wherever they live)

        point = self.fork_point(max_step)
        name = self.fork_name(kind)
        sets = list(sets) + self.faults_off()
        ranges: list[list[int]] = []
        lowest = self.next_batch(point) if point is not None else 0
        for lo, hi in skip:
            if hi >= lowest:
                ranges = add_range(ranges, max(lo, lowest), hi)
        argv = ["fork", str(self.run.path)]
        argv += ["--step", str(ckpt.checkpoint_step(point))] if point is not None else ["--from-scratch"]
        argv += ["--name", name]
        for item in sets:
            argv += ["--set", item]
        for lo, hi in ranges:
            argv += ["--skip-batches", f"{lo}:{hi}"]
        try:
            forking.parse_skip_ranges([f"{lo}:{hi}" for lo, hi in ranges])
            cfg = load_config(overrides=sets, base=self.run.config_dict())
            if point is not None:
                forking._refuse_changes(forking.changed_keys(self.run.config(), cfg))
        except KilnError as e:
            return {"error": str(e)}
        where = (
            f"from checkpoint step {ckpt.checkpoint_step(point)}"
            if point is not None
            else "from scratch (no valid checkpoint before the trouble)"
        )
        if self.faults_off():
            why += "; the injected [faults] are switched off in the fork"
        return {"command": "kiln " + shlex.join(argv), "argv": argv, "why": f"{where}: {why}"}

    def resume_remedy(self, why: str) -> dict[str, Any]:
        argv = ["train", "--resume", str(self.run.path)]
        for item in self.faults_off():
            argv += ["--set", item]
        return {"command": "kiln " + shlex.join(argv), "argv": argv, "why": why}
