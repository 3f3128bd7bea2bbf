"""The doctor's rules for a loss that runs away: divergence (the loss rose for good, or the guard
stopped the run), non-finite losses and gradients, and a gradient norm that keeps growing (the
early sign). `divergence_analysis` is shared: what comes after a divergence's onset belongs to it,
so the other rules leave it out.

Detection uses robust statistics (medians, MADs, Theil-Sen slopes) plus minimum relative effects,
because healthy tiny runs are noisy: the thresholds are the smallest effects worth a person's
attention, chosen so that clean runs (the test suite's, bench/faults.py's) report nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

import kiln.runs.doctor.series as series
from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import THEIL_SEN_POINTS, finding, ranges_of, theil_sen

REPEATED_INTERVENTIONS = 3  # this many guard interventions mean instability, not bad luck
DIVERGE_RATIO = 1.25  # divergence: the smoothed loss >= 1.25 x its best so far ...
DIVERGE_MIN_GAP = 0.3  # ... and at least 0.3 nats above it, to the end (>= 3 logged points) ...
EXCURSION_MIN = 8  # ... or for >= 8 logged points in a row (a spike lasts 1-3)
GIVE_BACK = 0.25  # ... or it gave back this share of its progress from the first loss, plus
GIVE_BACK_NOISE = 3.0  # this many deviations of the smoothed loss (a noisy loss has a low best),
GIVE_BACK_MIN_PROGRESS = 1.0  # once that progress is this many nats (near the unigram entropy a wrecked
# model stays < 1.25x its best: bench/faults.py, lr_high at LR 6e-3)
GRAD_GROWTH = 4.0  # grad_growth: the Theil-Sen trend multiplies the norm by >= 4 ...
GRAD_GROWTH_QUARTERS = 3.0  # ... and the last quarter's median is >= 3 x the first quarter's

INTERVENTION_KINDS = ("nonfinite", "loss_spike", "persistent_spike", "grad_spike")


def divergence_analysis(ctx: Context) -> dict[str, Any] | None:
    """Where the loss rose for good: {"rise": last healthy step, "onset": first bad step, ...}."""
    if "divergence" not in ctx.cache:
        ctx.cache["divergence"] = _divergence(ctx)
    return ctx.cache["divergence"]


def _divergence(ctx: Context) -> dict[str, Any] | None:
    guard_events = [e for e in ctx.events if e.get("kind") in INTERVENTION_KINDS and e.get("action") != "record"]
    stopped = ctx.status.get("state") == "stopped" or any(e.get("action") == "stop" for e in guard_events)
    if stopped and len(guard_events) >= REPEATED_INTERVENTIONS:
        first = min(e["step"] for e in guard_events)
        return {
            "rise": first - 1,
            "onset": first,
            "last": max(e["step"] for e in guard_events),
            "via": "guard",
            "interventions": len(guard_events),
            "reason": ctx.status.get("reason"),
        }
    steps, raw = ctx.loss_points(finite_only=False)
    n = len(raw)
    if n < 8:
        return None
    finite_at = np.isfinite(raw)
    vals = np.where(finite_at, raw, np.inf)
    smooth = series.running_median(vals, 2)  # a centred running median of 5
    nan_tail = int(np.argmax(finite_at[::-1])) if finite_at.any() else n
    smooth_known = np.isfinite(smooth)
    first_loss = float(smooth[np.argmax(smooth_known)]) if smooth_known.any() else math.inf
    diffs = np.diff(vals[finite_at])
    del finite_at, smooth_known
    # the deviation of one loss (MAD of step changes / sqrt 2), and of a median of 5 (x 1.25 / sqrt 5)
    noise = 0.0
    if len(diffs) >= 2:
        centre = series.median(diffs)
        diffs -= centre
        noise = series.median(np.abs(diffs, out=diffs)) * 1.4826 / math.sqrt(2) * 1.25 / math.sqrt(5)
    del diffs
    best = np.minimum.accumulate(smooth)  # high: far above the best smoothed loss so far
    with np.errstate(invalid="ignore"):  # in place where it can be: a long run's arrays are large
        known = np.isfinite(best)
        gap = smooth - best
        high = known & (gap >= DIVERGE_MIN_GAP)
        gave_back = np.zeros(n, bool)
        if math.isfinite(first_loss):
            progress = np.where(known, first_loss - best, 0.0)
            limit = GIVE_BACK * progress
            limit += GIVE_BACK_NOISE * noise
            gave_back = (progress >= GIVE_BACK_MIN_PROGRESS) & (gap >= limit)
            del progress, limit
        del gap
        high &= (smooth > best * DIVERGE_RATIO) | gave_back
    edges = np.diff(np.concatenate([[0], high.astype(np.int8), [0]]))
    # (first, end) of each stretch of high points
    runs = zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist())
    found = [(i, j) for i, j in runs if (j == n and j - i >= 3) or j - i >= EXCURSION_MIN]
    if not found and 2 <= nan_tail < n:
        found = [(n - nan_tail, n)]
    if not found:
        return None
    i, j = found[0]
    start = max(i, 1)
    before = np.where(np.isfinite(smooth[:start]), smooth[:start], np.inf)
    b = int(np.argmin(before)) if np.isfinite(before).any() else 0
    tail = series.median(vals[-max(3, math.ceil(0.1 * n)) :])
    excursion = vals[i:j][np.isfinite(vals[i:j])]
    peak = float(excursion.max()) if len(excursion) else math.inf
    return {
        "rise": int(steps[start - 1]),
        "onset": int(steps[start]),
        "last": int(steps[j - 1]),
        "via": "loss",
        "best_loss": float(smooth[b]),
        "best_step": int(steps[b]),
        "peak_loss": peak,
        "final_loss": tail,
        "recovered": j < n,
        "excursion_points": j - i,
        "nonfinite": nan_tail >= 2,
        "nonfinite_from": int(steps[n - nan_tail]) if nan_tail >= 2 else None,
    }


def divergence(ctx: Context) -> list[dict[str, Any]]:
    d = divergence_analysis(ctx)
    if d is None:
        return []
    lr, how = ctx.lower_lr(d["rise"])
    sets = [f"optim.lr={lr}"] + (["train.z_loss=0.0001"] if ctx.cfg is not None and not ctx.cfg.train.z_loss else [])
    more = {"effective_peak_lr": ctx.effective_peak(d["onset"]), "optim_lr": ctx.cfg.optim.lr if ctx.cfg else None}
    evidence = {k: v for k, v in {**d, **more}.items() if k != "via" and v is not None}
    if d["via"] == "guard":
        summary = (
            f"the guard intervened {d['interventions']} times from step {d['onset']} and stopped the run: "
            "the loss would not stay down"
        )
    elif d["nonfinite"] and not d["recovered"]:
        summary = (
            f"the loss became non-finite at step {d['nonfinite_from']} and stayed so "
            f"(best {d['best_loss']:.3f} at step {d['best_step']})"
        )
    elif d["recovered"]:
        summary = (
            f"the loss rose from its best {d['best_loss']:.3f} (step {d['best_step']}) after step {d['rise']} "
            f"to {d['peak_loss']:.3g} and stayed far above it until step {d['last']} (ends at "
            f"~{d['final_loss']:.3f})"
        )
    else:
        summary = (
            f"the loss rose from its best {d['best_loss']:.3f} (step {d['best_step']}) after step {d['rise']} "
            f"and stayed at ~{d['final_loss']:.3f}"
        )
    why = f"retrains from before the rise with peak optim.lr = {lr} ({how})" + (
        " and PaLM's z-loss against output-logit drift" if len(sets) > 1 else ""
    )
    return [
        finding(
            "divergence",
            "critical",
            (d["onset"], d["last"]),
            evidence,
            summary,
            ctx.fork_remedy("divergence", d["rise"] - 1, sets, why),
        )
    ]


def nonfinite(ctx: Context) -> list[dict[str, Any]]:
    d = divergence_analysis(ctx)
    cutoff = d["nonfinite_from"] if d and d.get("nonfinite_from") else math.inf
    if d and d["via"] == "guard":
        cutoff = d["onset"]
    bad: dict[int, dict[str, Any]] = {}
    for e in ctx.events:
        if e.get("kind") == "nonfinite" and isinstance(e.get("step"), int) and e["step"] < cutoff:
            bad[e["step"]] = {"data_index": e.get("data_index", ctx.batch_of(e["step"])), "action": e.get("action")}
    t = ctx.table
    bad_value = (t.is_number("loss") & ~t.finite("loss")) | (t.is_number("grad_norm") & ~t.finite("grad_norm"))
    for step in ctx.steps[bad_value & (ctx.steps < cutoff)].tolist():
        bad.setdefault(step, {"data_index": ctx.batch_of(step), "action": None})
    if not bad:
        return []
    steps = sorted(bad)
    actions = [bad[s]["action"] for s in steps]
    handled = all(a in ("skip", "rollback") for a in actions)
    severity = "warning" if handled else "critical"
    indices = [int(bad[s]["data_index"]) for s in steps]
    lr, how = ctx.lower_lr(steps[0])
    evidence = {
        "count": len(steps),
        "at_steps": steps[:20],
        "data_indices": indices[:20],
        "guard_actions": sorted({a or "none" for a in actions}),
    }
    what = "the guard discarded the update" if handled else "the update was not discarded"
    summary = (
        f"non-finite loss or gradient at {len(steps)} step(s) ({', '.join(map(str, steps[:5]))}"
        f"{', ...' if len(steps) > 5 else ''}); {what}"
    )
    why = f"retrains from before step {steps[0]} with peak optim.lr = {lr} ({how}), never training on the batches"
    return [
        finding(
            "nonfinite",
            severity,
            (steps[0], steps[-1]),
            evidence,
            summary,
            ctx.fork_remedy("nonfinite", steps[0] - 1, [f"optim.lr={lr}"], why, ranges_of(indices)),
        )
    ]


def grad_growth(ctx: Context) -> list[dict[str, Any]]:
    if divergence_analysis(ctx):
        return []  # the divergence explains it
    norms = ctx.table.numbers("grad_norm")
    with np.errstate(invalid="ignore"):
        keep = (ctx.steps > ctx.warmup) & ctx.table.finite("grad_norm") & (norms > 0)
    if int(keep.sum()) < 20:
        return []
    steps, ys = ctx.steps[keep], series.logs(norms[keep])
    n, first, last = len(steps), int(steps[0]), int(steps[-1])
    picked: Sequence[int] = range(n)
    if n > THEIL_SEN_POINTS:  # theil_sen's own subsample, taken here rather than from a million-item list
        picked = [round(i * (n - 1) / (THEIL_SEN_POINTS - 1)) for i in range(THEIL_SEN_POINTS)]
    slope = theil_sen([int(steps[i]) for i in picked], [float(ys[i]) for i in picked])
    growth = math.exp(slope * (last - first))
    q = n // 4
    early, late = math.exp(series.median(ys[:q])), math.exp(series.median(ys[-q:]))
    if growth < GRAD_GROWTH or late / early < GRAD_GROWTH_QUARTERS:
        return []
    doubled = series.first_where(ys, lambda y: math.exp(y) >= 2 * early)
    onset = int(steps[doubled]) if doubled is not None else first
    lr, how = ctx.lower_lr(onset)
    evidence = {
        "trend_growth": growth,
        "slope_log_per_step": slope,
        "early_grad_norm": early,
        "late_grad_norm": late,
        "doubled_at_step": onset,
    }
    summary = (
        f"the gradient norm grew ~{growth:.1f}x over steps {first}-{last} (median {early:.3g} -> "
        f"{late:.3g}): an early sign of instability"
    )
    return [
        finding(
            "grad_growth",
            "warning",
            (first, last),
            evidence,
            summary,
            ctx.fork_remedy(
                "grad_growth",
                onset,
                [f"optim.lr={lr}"],
                f"retrains from before the norm doubled with peak optim.lr = {lr} ({how})",
            ),
        )
    ]
