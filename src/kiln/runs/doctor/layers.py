"""`kiln doctor`'s rules that read layer statistics (layer_stats.jsonl): activations that blow up
against their peers and their own start, and attention that collapses or units that die."""

from __future__ import annotations

import math
from typing import Any

from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import finding, finite, median

PEER_RATIO = 10.0  # a module's activations >= 10 x its peers' median ...
OWN_GROWTH = 10.0  # ... and >= 10 x its own first sample
LOGIT_FLOOR = 30.0  # attention logits below this are harmless whatever their ratio
LOGIT_RATIO = 5.0
ENTROPY_FLOOR = 0.5  # nats: a collapsed layer attends to ~one key
ENTROPY_FRACTION = 0.25  # ... and has < 25% of its peers' (and its own earlier) entropy
DEAD_FRAC = 0.3  # dead_units: > 30% of a layer's hidden units never fire ...
DEAD_PEERS = 0.1  # ... while the other layers' median is below 10%


def _layers(ctx: Context) -> tuple[dict[str, list[dict[str, Any]]], Any]:
    """Records per module (by step), and `peers(module, step, stat)`: that statistic of the other
    modules of the same type (attention / MLP) at the step."""
    by_module: dict[str, list[dict[str, Any]]] = {}
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for r in ctx.layer_stats:
        if isinstance(r.get("step"), int) and isinstance(r.get("module"), str):
            by_module.setdefault(r["module"], []).append(r)
            by_step.setdefault(r["step"], {})[r["module"]] = r
    kind = {
        m: "attn" if "attn" in m or "attn_entropy" in recs[0] else "mlp" if "mlp" in m else "other"
        for m, recs in by_module.items()
    }

    def peers(module: str, step: int, stat: str) -> list[float]:
        return [
            r[stat]
            for m, r in by_step.get(step, {}).items()
            if m != module and kind[m] == kind[module] and finite(r.get(stat))
        ]

    return {m: sorted(recs, key=lambda r: r["step"]) for m, recs in sorted(by_module.items())}, peers


def _series(recs: list[dict[str, Any]], stat: str) -> list[tuple[int, float]]:
    return [(r["step"], r[stat]) for r in recs if finite(r.get(stat))]


def layer_blowups(ctx: Context) -> list[dict[str, Any]]:
    """One module's activations or attention logits far above its peers' and grown since the LR
    warmup ended. Growth is measured from there, not from initialisation: residual branches start
    near zero and grow tenfold in any healthy warmup (bench/faults.py: lr_low at LR 6e-3)."""
    modules, peers = _layers(ctx)
    warmup = ctx.cfg.schedule.warmup_steps if ctx.cfg is not None else 0
    out: list[dict[str, Any]] = []
    for module, recs in modules.items():
        for stat in ("act_rms", "act_max_abs", "attn_logit_max"):
            series = _series(recs, stat)
            after = [p for p in series if p[0] >= warmup]
            series = after if len(after) >= 2 else series
            if len(series) < 2:
                continue
            (_, first), (step, last) = series[0], series[-1]
            others = peers(module, step, stat)
            ratio = last / median(others) if others and median(others) > 0 else None
            growth = last / first if first > 0 else math.inf
            logits = stat == "attn_logit_max"
            if ratio is None:
                hit = growth >= (OWN_GROWTH if logits else 10 * OWN_GROWTH) and (not logits or last >= LOGIT_FLOOR)
            elif logits:
                hit = last >= LOGIT_FLOOR and ratio >= LOGIT_RATIO and growth >= 3
            else:
                hit = ratio >= PEER_RATIO and growth >= OWN_GROWTH
            if not hit:
                continue
            onset = step  # from where it stays >= 3x its peers (or first reached 3x its start)
            for s, v in reversed(series):
                o = peers(module, s, stat)
                if (ratio is not None and (not o or v < 3 * median(o))) or (ratio is None and v < 3 * first):
                    break
                onset = s
            kind = "attention_logit_blowup" if logits else "activation_blowup"
            evidence = {
                "module": module,
                "stat": stat,
                "value": last,
                "first_value": first,
                "growth": growth,
                "onset_step": onset,
                **({"peer_median": median(others), "ratio_to_peers": ratio} if ratio is not None else {}),
            }
            lr, how = ctx.lower_lr(onset)
            if logits and not (ctx.cfg and ctx.cfg.model.qk_norm):
                sets, why = ["model.qk_norm=true"], "QK-norm bounds the attention logits (its gains start at 1)"
            elif not (ctx.cfg and ctx.cfg.train.z_loss):
                sets, why = ["train.z_loss=0.0001", f"optim.lr={lr}"], f"z-loss and peak optim.lr = {lr} ({how})"
            else:
                sets, why = [f"optim.lr={lr}"], f"peak optim.lr = {lr} ({how})"
            what = "attention logits" if logits else f"activations ({stat})"
            peer_text = f", {ratio:.0f}x the other layers'" if ratio is not None else ""
            out.append(
                finding(
                    kind,
                    "warning",
                    (onset, step),
                    evidence,
                    f"{module}: {what} grew {growth:.0f}x to {last:.3g}{peer_text}",
                    ctx.fork_remedy(kind, onset - 1, sets, "retrains from before the growth: " + why),
                )
            )
            if not logits:
                break  # one activation finding per module
    return out


def collapsed_layers(ctx: Context) -> list[dict[str, Any]]:
    """entropy_collapse: one layer's attention entropy near 0 while the others keep theirs;
    dead_units: a large share of one MLP's hidden units never fire while the others' do."""
    modules, peers = _layers(ctx)
    out = []
    qk_on = bool(ctx.cfg and ctx.cfg.model.qk_norm)
    for module, recs in modules.items():
        series = _series(recs, "attn_entropy")
        if len(series) >= 2:
            step, last = series[-1]
            own_max, others = max(v for _, v in series[:-1]), peers(module, step, "attn_entropy")
            if (
                last < ENTROPY_FLOOR
                and last <= ENTROPY_FRACTION * own_max
                and (not others or last <= ENTROPY_FRACTION * median(others))
            ):
                onset = next((s for s, v in series if v <= 0.5 * own_max), step)
                lr, how = ctx.lower_lr(onset)
                sets, why = (
                    ([f"optim.lr={lr}"], f"peak optim.lr = {lr} ({how}); QK-norm is already on")
                    if qk_on
                    else (
                        ["model.qk_norm=true"],
                        "QK-norm keeps the attention logits from growing until softmax saturates",
                    )
                )
                out.append(
                    finding(
                        "entropy_collapse",
                        "warning",
                        (onset, step),
                        {
                            "module": module,
                            "attn_entropy": last,
                            "earlier_max": own_max,
                            "onset_step": onset,
                            **({"peer_median": median(others)} if others else {}),
                        },
                        f"{module}: attention entropy fell to {last:.3f} nats (from {own_max:.2f})"
                        + (f" while the other layers keep {median(others):.2f}" if others else ""),
                        ctx.fork_remedy("entropy_collapse", onset - 1, sets, "retrains from before the fall: " + why),
                    )
                )
        series = _series(recs, "dead_frac")
        if series:
            step, last = series[-1]
            others = peers(module, step, "dead_frac")
            normal = (
                (median(others) < DEAD_PEERS and last - median(others) >= 0.25)
                if others
                else series[0][1] <= DEAD_PEERS
            )
            if last > DEAD_FRAC and normal:
                onset = next((s for s, v in series if v > DEAD_FRAC), step)
                lr, how = ctx.lower_lr(onset)
                out.append(
                    finding(
                        "dead_units",
                        "warning",
                        (onset, step),
                        {
                            "module": module,
                            "dead_frac": last,
                            "onset_step": onset,
                            **({"peer_median": median(others)} if others else {}),
                        },
                        f"{module}: {100 * last:.0f}% of the hidden units never activate"
                        + (f" (other layers {100 * median(others):.0f}%)" if others else ""),
                        ctx.fork_remedy(
                            "dead_units",
                            onset - 1,
                            [f"optim.lr={lr}"],
                            f"retrains from before the units died with peak optim.lr = {lr} "
                            f"({how}); dead units rarely recover by themselves",
                        ),
                    )
                )
    return out
