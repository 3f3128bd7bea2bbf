"""The doctor's spike rule: loss spikes (the guard's events, or logged losses far above their
recent level that come back down) and gradient-norm spikes, grouped into incidents, with PaLM's
remedy (retrain from before the spike without its batches) or, when the guard kept intervening,
a lower learning rate."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import kiln.runs.doctor.series as series
from kiln.runs.doctor.context import Context
from kiln.runs.doctor.divergence import REPEATED_INTERVENTIONS, divergence_analysis
from kiln.runs.doctor.findings import finding, finite, num, ranges_of

SPIKE_WINDOW = 20  # trailing logged points that define the loss's recent level
SPIKE_MIN_HISTORY = 8  # ... and how many are needed before judging (the first steps are never spikes)
SPIKE_Z = 6.0  # a spike is > 6 robust standard deviations (1.4826 MAD) of log loss above the median
SPIKE_MIN_JUMP = math.log(1.3)  # ... and at least 30% above it
SPIKE_RECOVERY = 5  # it must come back (halfway) within this many logged points
SPIKE_MARGIN = 2  # batches skipped on each side of a spike's batches (PaLM skipped a few hundred)
SPIKE_CLUSTER = 5  # spikes this few steps apart are one incident


def metric_spikes(points: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    """(step, loss, recent level) of every logged loss far above its recent robust level that
    comes back down; spikes never enter the baseline, a level that does not come back does."""
    return series.spikes_of(
        np.array([p[0] for p in points], np.int64),
        np.array([p[1] for p in points], np.float64),
        SPIKE_WINDOW,
        SPIKE_MIN_HISTORY,
        SPIKE_Z,
        SPIKE_MIN_JUMP,
        SPIKE_RECOVERY,
    )


def spikes(ctx: Context) -> list[dict[str, Any]]:
    """Loss spikes (guard events, or logged losses far above their recent level that come back)
    and gradient-norm spikes (guard records: clipped and applied, so information only)."""
    d = divergence_analysis(ctx)
    if d and d["via"] == "guard":
        return []
    end = d["onset"] if d else math.inf  # what comes after the divergence's onset belongs to it
    clusters, merged = _clusters(_incidents(ctx, end))
    return [_cluster_finding(ctx, c, c is merged) for c in clusters]


def _incidents(ctx: Context, end: float) -> list[dict[str, Any]]:
    """Every spike before `end`: the guard's events, and the logged losses far above their recent
    level that it did not record (with that level, for the guard's too when the log shows it)."""
    incidents: list[dict[str, Any]] = []
    for e in ctx.events:
        kind = {"loss_spike": "loss_spike", "persistent_spike": "loss_spike", "grad_spike": "grad_spike"}.get(
            e.get("kind", "")
        )
        if kind and isinstance(e.get("step"), int) and e["step"] < end:
            incidents.append(
                {
                    "step": e["step"],
                    "kind": kind,
                    "data_index": e.get("data_index"),
                    "action": e.get("action"),
                    "loss": e.get("loss"),
                    "grad_norm": e.get("grad_norm"),
                }
            )
    seen = {i["step"] for i in incidents if i["kind"] == "loss_spike"}
    loss_steps, loss_values = ctx.loss_points()
    found = series.spikes_of(
        loss_steps,
        loss_values,
        SPIKE_WINDOW,
        SPIKE_MIN_HISTORY,
        SPIKE_Z,
        SPIKE_MIN_JUMP,
        SPIKE_RECOVERY,
    )
    for step, loss, level in found:
        if step < end and not any(abs(step - s) <= 1 for s in seen):
            incidents.append(
                {
                    "step": step,
                    "kind": "loss_spike",
                    "data_index": ctx.batch_of(step),
                    "action": None,
                    "loss": loss,
                    "level": level,
                }
            )
        elif step < end:
            for i in incidents:
                if i["kind"] == "loss_spike" and abs(step - i["step"]) <= 1:
                    i.setdefault("level", level)
    return incidents


def _clusters(
    incidents: list[dict[str, Any]],
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]] | None]:
    """The incidents grouped (same kind, <= SPIKE_CLUSTER steps apart), and the one group the
    loss spikes the guard handled make when there were REPEATED_INTERVENTIONS of them or more
    (an unstable run rather than bad batches), else None."""
    clusters: list[list[dict[str, Any]]] = []
    for inc in sorted(incidents, key=lambda i: (i["kind"], i["step"])):
        last = clusters[-1] if clusters else None
        if last and last[0]["kind"] == inc["kind"] and inc["step"] - last[-1]["step"] <= SPIKE_CLUSTER:
            clusters[-1].append(inc)
        else:
            clusters.append([inc])
    losses = [c for c in clusters if c[0]["kind"] == "loss_spike"]
    repeated = [c for c in losses if all(i["action"] in ("skip", "rollback") for i in c)]
    if len(repeated) >= REPEATED_INTERVENTIONS:
        merged = sorted((i for c in repeated for i in c), key=lambda i: i["step"])
        return [c for c in clusters if not any(c is r for r in repeated)] + [merged], merged
    return clusters, None


def _evidence(c: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A group's evidence, and its peak incident (the highest loss, or gradient norm)."""
    kind = c[0]["kind"]
    evidence: dict[str, Any] = {
        "count": len(c),
        "at_steps": [i["step"] for i in c][:20],
        "data_indices": [int(i["data_index"]) for i in c if i.get("data_index") is not None][:20],
        "guard_actions": sorted({i["action"] or "none" for i in c}),
    }
    peak = max(c, key=lambda i: num(i.get("loss" if kind == "loss_spike" else "grad_norm")) or 0.0)
    for key in ("loss", "grad_norm"):
        if finite(peak.get(key)):
            evidence[key] = peak[key]
    if peak.get("level") and finite(peak.get("loss")):
        evidence["recent_level"] = peak["level"]
        evidence["jump"] = peak["loss"] / peak["level"]
    return evidence, peak


def _cluster_finding(ctx: Context, c: list[dict[str, Any]], merged: bool) -> dict[str, Any]:
    """One group's finding: a gradient-norm spike or a rolled-back loss spike is information, the
    guard's repeated interventions a lower LR, any other loss spike PaLM's remedy."""
    kind, first, last = c[0]["kind"], c[0]["step"], c[-1]["step"]
    at = f"step {first}" + (f"..{last}" if last != first else "")
    evidence, peak = _evidence(c)
    actions = evidence["guard_actions"]
    if kind == "grad_spike":
        return finding(
            kind, "info", (first, last), evidence, f"gradient-norm spike at {at} (clipped; guard: {'/'.join(actions)})"
        )
    skip = ranges_of([int(i["data_index"]) for i in c if i.get("data_index") is not None], SPIKE_MARGIN)
    if merged:
        lr, how = ctx.lower_lr(first)
        return finding(
            kind,
            "warning",
            (first, last),
            evidence,
            f"the guard handled {len(c)} loss spikes between steps {first} and {last}: the run "
            "is unstable at this learning rate",
            ctx.fork_remedy(
                kind,
                first - 1,
                [f"optim.lr={lr}"],
                f"retrains from before the first spike with peak optim.lr = {lr} ({how}), skipping the spikes' batches",
                skip,
            ),
        )
    if all(i["action"] == "rollback" for i in c):  # the guard did PaLM's remedy
        return finding(
            kind,
            "info",
            (first, last),
            evidence,
            f"loss spike at {at}; the guard rolled back and skipped its batches, nothing to do",
        )
    vs_level = f" ({peak['loss']:.3f} vs a recent {peak['level']:.3f})" if peak.get("level") else ""
    stop = "stop" in actions
    what = (
        "the guard discarded the update"
        if set(actions) <= {"skip", "rollback"}
        else "the guard stopped the run"
        if stop
        else "it was trained on"
    )
    return finding(
        kind,
        "critical" if stop else "warning",
        (first, last),
        evidence,
        f"loss spike at {at}{vs_level}; {what}",
        ctx.fork_remedy(
            kind,
            first - 1,
            [],
            "PaLM's remedy: retrains from the checkpoint before the spike "
            f"without the data batches around it ({SPIKE_MARGIN} either side)",
            skip,
        ),
    )
