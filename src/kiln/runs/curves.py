"""Plot series of runs with their lineage: a fork's curve is its ancestors' records up to each
fork point, then its own (shared by `kiln compare` and `kiln report`), and atomic file writes
for what those commands produce."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kiln.fileio import atomic_path
from kiln.runfolder.columns import BIGINT, BOOL, FLOAT, INT, Table
from kiln.runs.rundir import RunDir

Source = Literal["metrics", "evals"]
NOT_SERIES = ("step", "tokens")  # keys of every record: axes, not curves


@dataclass
class Segment:
    """One run's stretch of a curve: `inherited` when the records are an ancestor's."""

    run: str
    xs: list[float]
    ys: list[float]
    inherited: bool = False
    path: Path | None = None
    steps: list[int] = field(default_factory=list)
    x: str = "tokens"  # what xs hold: "tokens", or "step" where some record lacks tokens


@dataclass
class Curve:
    """A Segment as arrays (a long run's curve has a million points)."""

    run: str
    xs: np.ndarray
    ys: np.ndarray
    inherited: bool
    path: Path | None
    steps: np.ndarray
    x: str


def number(value: Any) -> float | None:
    """A finite number from a record, else None (NaN/inf, strings, booleans, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def table(run: RunDir, source: Source) -> Table:
    """The run's records of `source` by column (kiln.runfolder.columns)."""
    if source not in ("metrics", "evals"):
        raise ValueError(f"source must be 'metrics' or 'evals', not {source!r}")
    return run.metrics_table() if source == "metrics" else run.evals_table()


def records(run: RunDir, source: Source) -> list[dict[str, Any]]:
    if source not in ("metrics", "evals"):
        raise ValueError(f"source must be 'metrics' or 'evals', not {source!r}")
    return run.metrics() if source == "metrics" else run.evals()


def _int_steps(t: Table) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose step is an int, those steps): what `isinstance(r.get("step"), int)` keeps."""
    values, kinds = t.column("step")
    rows = np.flatnonzero((kinds == INT) | (kinds == BOOL) | (kinds == BIGINT))
    return rows, values[rows].astype(np.int64)


def lineage_tables(run: RunDir, source: Source) -> list[tuple[RunDir, Table, bool]]:
    """(run, its records that lead to `run`, inherited) for every ancestor (records with step
    at most the step the next generation forked at), oldest first, then `run` itself with all
    of its records; the records as Tables."""
    out = []
    for ancestor, upto in run.ancestry():
        t = table(ancestor, source)
        rows, steps = _int_steps(t)
        kept = rows[steps <= upto]
        out.append((ancestor, t if len(kept) == t.rows else t.take(kept), True))
    out.append((run, table(run, source), False))
    return out


def lineage_records(run: RunDir, source: Source) -> list[tuple[RunDir, list[dict[str, Any]], bool]]:
    """lineage_tables with the records as dicts (for code that wants them; a long run's are many)."""
    return [(owner, t.records(), inherited) for owner, t, inherited in lineage_tables(run, source)]


def lineage_events(run: RunDir) -> list[tuple[str, dict[str, Any], bool]]:
    """(run name, event, inherited) along the lineage: each ancestor's events up to the step the
    next generation forked at, oldest first, then the run's own events."""
    out = [
        (ancestor.name, e, True)
        for ancestor, upto in run.ancestry()
        for e in ancestor.events()
        if isinstance(e.get("step"), int) and e["step"] <= upto
    ]
    return out + [(run.name, e, False) for e in run.events()]


def _has_tokens(chain: list[tuple[RunDir, Table, bool]], key: str) -> bool:
    """Every record holding `key` has a finite number of tokens."""
    return not any(bool((t.present(key) & ~t.finite("tokens")).any()) for _, t, _ in chain)


def _steps_of(t: Table, rows: np.ndarray) -> np.ndarray:
    """int(r.get("step", 0)) of the rows (0 where it is missing or not a number)."""
    values, kinds = t.column("step")
    values, kinds = values[rows], kinds[rows]
    usable = ((kinds == INT) | (kinds == BOOL) | (kinds == FLOAT) | (kinds == BIGINT)) & np.isfinite(values)
    return np.where(usable, np.trunc(np.where(usable, values, 0.0)), 0.0).astype(np.int64)


def lineage_curves(
    run: RunDir, source: Source = "metrics", key: str = "loss", x: Literal["auto", "tokens", "step"] = "auto"
) -> list[Curve]:
    """lineage_series as arrays: what plots of a long run draw from."""
    chain = lineage_tables(run, source)
    axis = x if x != "auto" else ("tokens" if _has_tokens(chain, key) else "step")
    curves = []
    for owner, t, inherited in chain:
        rows = np.flatnonzero(t.is_number(key) & t.finite(axis))
        if inherited and not len(rows):
            continue
        # NaN stays in ys: matplotlib draws it as a gap where the guard saw one
        curves.append(
            Curve(
                owner.name, t.numbers(axis)[rows], t.numbers(key)[rows], inherited, owner.path, _steps_of(t, rows), axis
            )
        )
    return curves


def lineage_series(
    run: RunDir, source: Source = "metrics", key: str = "loss", x: Literal["auto", "tokens", "step"] = "auto"
) -> list[Segment]:
    """The curve of `key` along the run's lineage, one Segment per generation, oldest first.
    Inherited segments with no points (a from-scratch fork) are left out; the run's own segment
    is always last, maybe empty. x "auto" is tokens when every record holding `key` has them."""
    return [
        Segment(c.run, c.xs.tolist(), c.ys.tolist(), c.inherited, c.path, c.steps.tolist(), c.x)
        for c in lineage_curves(run, source, key, x)
    ]


def series_keys(run: RunDir, source: Source) -> set[str]:
    """Numeric keys of the run's (and its lineage's) records of `source`."""
    keys: set[str] = set()
    for _, t, _ in lineage_tables(run, source):
        keys.update(k for k in t.numeric_keys() if k not in NOT_SERIES)
    return keys


def source_of(run: RunDir, key: str) -> Source | None:
    """Where `key` is recorded for this run: metrics.jsonl first, then eval.jsonl."""
    for source in ("metrics", "evals"):
        if key in series_keys(run, source):
            return source
    return None


def step_to_x(run: RunDir, steps: list[int], axis: str) -> list[float]:
    """Positions of `steps` on a tokens (or step) axis, from the lineage's records: events
    carry steps only. Steps without a record are interpolated between known ones."""
    if axis == "step":
        return [float(s) for s in steps]
    all_steps, all_tokens = [], []
    for source in ("metrics", "evals"):
        for _, t, _ in lineage_tables(run, source):
            rows, at = _int_steps(t)
            counted = t.finite("tokens")[rows]
            all_steps.append(at[counted])
            all_tokens.append(t.numbers("tokens")[rows[counted]])
    known_steps, first = np.unique(np.concatenate(all_steps), return_index=True)  # the first record of a step
    if not len(known_steps):
        return [float(s) for s in steps]
    known_tokens = np.concatenate(all_tokens)[first]
    out = []
    for s in steps:
        i = int(np.searchsorted(known_steps, s, side="right"))  # known_steps[:i] <= s
        below = (int(known_steps[i - 1]), float(known_tokens[i - 1])) if i else None
        if below is not None and below[0] == s:
            out.append(below[1])
            continue
        above = (int(known_steps[i]), float(known_tokens[i])) if i < len(known_steps) else None
        if below is not None and above is not None:
            (s0, t0), (s1, t1) = below, above
            out.append(t0 + (t1 - t0) * (s - s0) / (s1 - s0))
        else:  # beyond the records: tokens per step of the nearest one
            s0, t0 = below or above  # type: ignore[misc]
            out.append(t0 / s0 * s if s0 else float(s))
    return out


# --------------------------------------------------------------------------- writing files


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """A matplotlib figure as PNG, atomically, at exactly figsize × dpi pixels (no tight bbox)
    and without the Software metadata (which names a web address)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
