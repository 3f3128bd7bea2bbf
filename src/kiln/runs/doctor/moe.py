"""The doctor's mixture-of-experts rule: a collapsed router, read from the routing statistics
the `routing` callback writes (`moe/<layer>/load_max_mean` in metrics.jsonl).

A router has collapsed when, over the last quarter of the run after warm-up, its busiest expert
takes at least half of what it could (load max / mean >= half of experts / top-k, and >= 2):
most tokens then go to a few experts, the rest learn nothing and the model has the capacity of
a small dense one. The remedy forks from before the collapse with the auxiliary-loss-free
balancing bias switched on (or its rate doubled) and a Switch auxiliary loss.
"""

from __future__ import annotations

import re
from statistics import median
from typing import Any

from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import finding

LOAD_KEY = re.compile(r"^moe/(.+)/load_max_mean$")
COLLAPSE_SHARE = 0.5  # the busiest expert at >= 50% of its possible excess ...
COLLAPSE_MIN_RATIO = 2.0  # ... and at least twice the mean load
MIN_RECORDS = 8


def router_collapse(ctx: Context) -> list[dict[str, Any]]:
    if ctx.cfg is None or ctx.cfg.model.moe.experts < 2:
        return []
    m = ctx.cfg.model
    threshold = max(COLLAPSE_MIN_RATIO, COLLAPSE_SHARE * m.moe.experts / m.moe.top_k)
    t = ctx.table
    layers = sorted({match.group(1) for k in t.keys if (match := LOAD_KEY.match(k)) and t.present(k).any()})
    out = []
    for layer in layers:
        key = f"moe/{layer}/load_max_mean"
        keep = (ctx.steps > ctx.warmup) & t.finite(key)
        pts = list(zip(ctx.steps[keep].tolist(), t.numbers(key)[keep].tolist()))
        if len(pts) < MIN_RECORDS:
            continue
        tail = pts[-max(MIN_RECORDS // 2, len(pts) // 4) :]
        level = median(v for _, v in tail)
        if level < threshold:
            continue
        onset = tail[0][0]  # the first step of the final stretch at or above the threshold
        for step, value in reversed(pts):
            if value < threshold:
                break
            onset = step
        sets = [f"model.moe_bias_rate={max(1e-3, 2 * m.moe.bias_rate):g}"]
        if m.moe.aux_loss == 0:
            sets.append("model.moe_aux_loss=0.01")
        why = f"balances the experts again: {sets[0].split('=')[0]} = {sets[0].split('=')[1]}" + (
            ", plus a Switch auxiliary loss of 0.01" if len(sets) > 1 else ""
        )
        evidence = {
            "layer": layer,
            "load_max_mean": level,
            "threshold": threshold,
            "experts": m.moe.experts,
            "top_k": m.moe.top_k,
            "since_step": onset,
        }
        summary = (
            f"{layer}: the router collapsed — its busiest expert gets {level:.2f}x the mean load "
            f"(at most {m.moe.experts / m.moe.top_k:g}x with {m.moe.experts} experts, top-{m.moe.top_k}) "
            f"since step {onset}"
        )
        out.append(
            finding(
                "router_collapse",
                "warning",
                (onset, pts[-1][0]),
                evidence,
                summary,
                ctx.fork_remedy("router_collapse", onset, sets, why),
            )
        )
    return out
