"""Plot series of runs with their lineage: a fork's curve is its ancestors' records up to each
fork point, then its own (shared by `kiln compare` and `kiln report`), and atomic file writes
for what those commands produce."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


def number(value: Any) -> float | None:
    """A finite number from a record, else None (NaN/inf, strings, booleans, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def records(run: RunDir, source: Source) -> list[dict[str, Any]]:
    if source not in ("metrics", "evals"):
        raise ValueError(f"source must be 'metrics' or 'evals', not {source!r}")
    return run.metrics() if source == "metrics" else run.evals()


def lineage_records(run: RunDir, source: Source) -> list[tuple[RunDir, list[dict[str, Any]], bool]]:
    """(run, its records that lead to `run`, inherited) for every ancestor (records with step
    at most the step the next generation forked at), oldest first, then `run` itself with all
    of its records."""
    out = []
    for ancestor, upto in run.ancestry():
        kept = [r for r in records(ancestor, source) if isinstance(r.get("step"), int) and r["step"] <= upto]
        out.append((ancestor, kept, True))
    out.append((run, records(run, source), False))
    return out


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


def _has_tokens(chain: list[tuple[RunDir, list[dict[str, Any]], bool]], key: str) -> bool:
    return all(number(r.get("tokens")) is not None for _, recs, _ in chain for r in recs if key in r)


def lineage_series(
    run: RunDir, source: Source = "metrics", key: str = "loss", x: Literal["auto", "tokens", "step"] = "auto"
) -> list[Segment]:
    """The curve of `key` along the run's lineage, one Segment per generation, oldest first.
    Inherited segments with no points (a from-scratch fork) are left out; the run's own segment
    is always last, maybe empty. x "auto" is tokens when every record holding `key` has them."""
    chain = lineage_records(run, source)
    axis = x if x != "auto" else ("tokens" if _has_tokens(chain, key) else "step")
    segments = []
    for owner, recs, inherited in chain:
        xs, ys, steps = [], [], []
        for r in recs:
            if key not in r or number(r.get(axis)) is None:
                continue
            y = r[key]
            if isinstance(y, bool) or not isinstance(y, (int, float)):
                continue
            xs.append(float(r[axis]))
            ys.append(float(y))  # NaN stays: matplotlib draws it as a gap where the guard saw one
            steps.append(int(r.get("step", 0)))
        if inherited and not xs:
            continue
        segments.append(Segment(owner.name, xs, ys, inherited, owner.path, steps, axis))
    return segments


def series_keys(run: RunDir, source: Source) -> set[str]:
    """Numeric keys of the run's (and its lineage's) records of `source`."""
    keys: set[str] = set()
    for _, recs, _ in lineage_records(run, source):
        for r in recs:
            keys.update(
                k
                for k, v in r.items()
                if k not in NOT_SERIES and isinstance(v, (int, float)) and not isinstance(v, bool)
            )
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
    known: dict[int, float] = {}
    for source in ("metrics", "evals"):
        for _, recs, _ in lineage_records(run, source):
            for r in recs:
                if isinstance(r.get("step"), int) and number(r.get("tokens")) is not None:
                    known.setdefault(r["step"], float(r["tokens"]))
    if not known:
        return [float(s) for s in steps]
    pts = sorted(known.items())
    out = []
    for s in steps:
        if s in known:
            out.append(known[s])
            continue
        below = [p for p in pts if p[0] <= s]
        above = [p for p in pts if p[0] >= s]
        if below and above:
            (s0, t0), (s1, t1) = below[-1], above[0]
            out.append(t0 + (t1 - t0) * (s - s0) / (s1 - s0))
        else:  # beyond the records: tokens per step of the nearest one
            s0, t0 = (below or above)[-1 if below else 0]
            out.append(t0 / s0 * s if s0 else float(s))
    return out


# --------------------------------------------------------------------------- writing files


def write_atomic(path: Path, data: bytes | str) -> None:
    """Readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """A matplotlib figure as PNG, atomically, at exactly figsize × dpi pixels (no tight bbox)
    and without the Software metadata (which names a web address)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})
    os.replace(tmp, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
