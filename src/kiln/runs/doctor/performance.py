"""The doctor's rules that read step times: steps far slower than comparable ones (loader stalls
among them, when the step_time callback logged the data phase) and one rank that every other
rank waits for."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

import kiln.runs.doctor.series as series
from kiln.runfolder.columns import MISSING
from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import finding, finite

SLOW_FACTOR = 3.0  # a slow interval costs >= 3 typical steps' time ...
SLOW_MIN_S = 0.3  # ... and >= 0.3 s ...
SLOW_Z = 10.0  # ... and > 10 robust deviations above the median of comparable steps
SLOW_SHARE = 0.5  # information, unless > 3 of them cost half of the run's step time
WARMUP_INTERVALS = 3  # the first logged intervals carry start-up work
SLOW_RANK_RATIO = 1.3  # a rank busy >= 1.3 x the others' median ...
SLOW_RANK_SHARE = 0.75  # ... in >= 75% of the records
RANK_KEY = re.compile(r"^step_time/rank(\d+)_busy_s$")
PHASE_KEYS = [f"step_time/{p}_s" for p in ("data", "forward_backward", "grad_norm", "optimizer")]
Levels = dict[tuple[int, str], tuple[float, float]]  # (median, robust deviation) by (group, phase)


def _interval_times(ctx: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, step, steps in the logged interval, mean seconds per step) of each logged interval,
    from tokens_per_s: arrays, one entry an interval."""
    t, steps = ctx.table, ctx.steps
    if len(steps) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0)
    tokens, rate, counted = t.numbers("tokens"), t.numbers("tokens_per_s"), t.is_number("tokens")
    k = np.diff(steps)
    with np.errstate(invalid="ignore"):
        keep = t.finite("tokens_per_s")[1:] & (rate[1:] > 0) & counted[1:] & counted[:-1] & (k > 0)
        keep &= tokens[1:] > tokens[:-1]
    rows = np.flatnonzero(keep) + 1
    ks = k[keep]
    del k, keep
    seconds = tokens[rows]  # (tokens - previous tokens) / k / tokens_per_s, in place
    seconds -= tokens[rows - 1]
    seconds /= ks
    seconds /= rate[rows]
    return rows, steps[rows], ks, seconds


def _groups(steps: np.ndarray, ks: np.ndarray, every: Any) -> np.ndarray:
    """How many of the steps of each interval (step - k, step] layer_stats sampled (every `every`)."""
    if not every:
        return np.zeros(len(steps), np.int8)
    if isinstance(every, int) and not isinstance(every, bool):
        e = abs(every)
        return steps // e - (steps - ks) // e
    pairs = zip(steps.tolist(), ks.tolist())
    return np.array([sum(1 for s in range(step - k + 1, step + 1) if s % every == 0) for step, k in pairs], np.int64)


def slow_steps(ctx: Context) -> list[dict[str, Any]]:
    """Steps far slower than comparable ones: per phase when the step_time callback was on (a
    stall in the data phase is a loader stall), else from tokens_per_s. Warm-up intervals are
    left out, and the steps layer_stats samples (slower by design) are judged among themselves.
    Every interval is judged at once on arrays; the few slow ones are described one by one."""
    rows, steps, ks, secs = (a[WARMUP_INTERVALS:] for a in _interval_times(ctx))
    if len(secs) < 5:
        return []
    every = 0
    if ctx.cfg is not None and "layer_stats" in ctx.cfg.callbacks.enabled:
        every = (ctx.cfg.callbacks.options.get("layer_stats") or {}).get("every", 10)
    groups = _groups(steps, ks, every)
    typical = series.median(secs)
    floor = max(SLOW_MIN_S, SLOW_FACTOR * typical)
    logged = [p for p in PHASE_KEYS if p in ctx.table.keys]  # the others have no samples, and no hits
    values = {p: ctx.table.numbers(p)[rows] for p in logged}
    known = {p: ctx.table.finite(p)[rows] for p in logged}
    level = _levels(groups, secs, values, known)
    hit = _slow_intervals(groups, secs, ks, values, known, level, typical, floor)
    found: dict[str, list[dict[str, Any]]] = {"slow_steps": [], "loader_stall": []}
    for i in np.flatnonzero(hit).tolist():
        row, g = int(rows[i]), int(groups[i])
        slow = _slow_interval(ctx, row, int(steps[i]), int(ks[i]), float(secs[i]), g, level, typical, floor)
        if slow is not None:
            found[slow[0]].append(slow[1])
    total = sum(series.blockwise(secs * ks))  # summed in order by Python, as a list of records was
    return [_slow_finding(kind, items, typical, total) for kind, items in found.items() if items]


def _levels(
    groups: np.ndarray, secs: np.ndarray, values: dict[str, np.ndarray], known: dict[str, np.ndarray]
) -> Levels:
    """The typical time of each group of intervals, in total and in each logged phase (where
    there are at least 3 samples)."""
    level: Levels = {}
    for g in np.unique(groups).tolist():
        mine = groups == g
        for p in ["total", *values]:
            v = secs[mine] if p == "total" else values[p][mine & known[p]]  # a copy: worked on in place
            if len(v) >= 3:
                level[(g, p)] = series.median_and_deviation(v)
    return level


def _slow_intervals(
    groups: np.ndarray,
    secs: np.ndarray,
    ks: np.ndarray,
    values: dict[str, np.ndarray],
    known: dict[str, np.ndarray],
    level: Levels,
    typical: float,
    floor: float,
) -> np.ndarray:
    """Which intervals are slow, all at once: a phase is judged where it was logged and has a
    level, the total time where no phase was."""

    def slow(v: np.ndarray, med: float, sigma: float) -> np.ndarray:
        """(v - med) * k >= floor and v - med >= SLOW_Z * sigma, with one temporary array."""
        excess = v - med
        out = excess >= SLOW_Z * sigma
        excess *= ks
        out &= excess >= floor
        return out

    hit = np.zeros(len(secs), bool)
    with np.errstate(invalid="ignore"):
        for g in np.unique(groups).tolist():
            mine = groups == g
            judged = np.zeros(len(secs), bool)
            for p in values:
                if (g, p) in level:
                    rows_p = mine & known[p]
                    judged |= rows_p
                    hit |= rows_p & slow(values[p], *level[(g, p)])
            hit |= mine & ~judged & slow(secs, *level.get((g, "total"), (typical, 0.0)))
    return hit


def _slow_interval(
    ctx: Context, row: int, step: int, k: int, t: float, g: int, level: Levels, typical: float, floor: float
) -> tuple[str, dict[str, Any]] | None:
    """A slow interval described from its record: ("loader_stall" or "slow_steps", what it
    cost), by the phase that lost the most time; None when no phase (nor the total) is slow."""
    rec = {p: v for p in PHASE_KEYS if (v := ctx.table.value(p, row)) is not MISSING}
    hits = []
    for p in [p for p in PHASE_KEYS if finite(rec.get(p)) and (g, p) in level] or ["total"]:
        value = t if p == "total" else rec[p]
        med, sigma = level.get((g, p), (typical, 0.0))
        if (value - med) * k >= floor and value - med >= SLOW_Z * sigma:
            hits.append(((value - med) * k, p))
    if not hits:
        return None
    excess, p = max(hits)
    item = {
        "step": step,
        "seconds": t * k,
        "excess_s": excess,
        "data_s": (rec.get(p) or 0.0) * k,
        "phase": p.removeprefix("step_time/").removesuffix("_s"),
    }
    return ("loader_stall" if p == "step_time/data_s" else "slow_steps"), item


def _slow_finding(kind: str, items: list[dict[str, Any]], typical: float, total: float) -> dict[str, Any]:
    hit_steps, lost = [i["step"] for i in items], sum(i["excess_s"] for i in items)
    evidence = {
        "count": len(items),
        "at_steps": hit_steps[:20],
        "seconds": [i["seconds"] for i in items][:20],
        "median_step_s": typical,
        "lost_s": lost,
        "share_of_time": lost / total if total else 0.0,
    }
    phases = sorted({i["phase"] for i in items} - {"total"})
    if kind == "loader_stall":
        evidence["data_s"] = [i["data_s"] for i in items][:20]
        text = "step(s) that spent their extra time reading data"
        hint = "; check the file system the data shards are read from"
    else:
        text, hint = "step(s) far slower than the median", f" (time spent in {', '.join(phases)})" if phases else ""
        if phases:
            evidence["phases"] = phases
    severity = "warning" if len(items) > 3 and evidence["share_of_time"] >= SLOW_SHARE else "info"
    return finding(
        kind,
        severity,
        (hit_steps[0], hit_steps[-1]),
        evidence,
        f"{len(items)} {text} ({typical * 1000:.3g} ms a step): {lost:.1f}s lost{hint}",
    )


def slow_rank(ctx: Context) -> list[dict[str, Any]]:
    """step_time's per-rank busy time: one rank consistently far above the others."""
    t = ctx.table
    rank_keys = [(int(m.group(1)), k) for k in t.keys if (m := RANK_KEY.match(k))]
    if not rank_keys:
        return []
    ranks = sorted({r for r, _ in rank_keys})
    busy = np.full((t.rows, len(ranks)), np.nan)  # a record's finite busy times by rank
    logged = np.zeros(t.rows, bool)
    for rank, key in rank_keys:
        ok = t.finite(key)
        busy[ok, ranks.index(rank)] = t.numbers(key)[ok]
        logged |= t.present(key)
    steps = ctx.steps[logged].tolist()
    busy = busy[(~np.isnan(busy)).sum(axis=1) >= 2]
    out = []
    for c, rank in enumerate(ranks):
        mine = ~np.isnan(busy[:, c])
        if not mine.any():
            continue
        others = busy[mine].copy()
        others[:, c] = np.nan
        level = series.row_medians(others)
        ok = level > 0
        ratios = busy[mine, c][ok] / level[ok]
        share = float((ratios >= SLOW_RANK_RATIO).sum()) / len(ratios) if len(ratios) else 0.0
        if len(ratios) < 5 or share < SLOW_RANK_SHARE or series.median(ratios) < SLOW_RANK_RATIO:
            continue
        per_rank = {
            f"rank{k}_busy_s": series.median(busy[~np.isnan(busy[:, j]), j])
            for j, k in enumerate(ranks)
            if not np.isnan(busy[0, j])
        }
        ratio = series.median(ratios)
        out.append(
            finding(
                "slow_rank",
                "warning",
                (steps[0], steps[-1]),
                {"rank": rank, "ratio_to_others": ratio, "share_of_records": share, **per_rank},
                f"rank {rank} is busy {ratio:.2f}x as long as the other ranks in "
                f"{100 * share:.0f}% of the steps: every rank waits for it (check its GPU, node and "
                "data path)",
            )
        )
    return out
