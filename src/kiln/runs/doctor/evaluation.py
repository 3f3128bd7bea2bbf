"""The doctor's rules that read evaluations (eval.jsonl): overfitting (the validation loss rises
while the training loss falls, or the training loss falls far below it) and regressions of the
validation loss or of a suite's metric between two evaluations."""

from __future__ import annotations

import math
import shlex
from typing import Any

from kiln.runs.doctor.context import Context
from kiln.runs.doctor.divergence import divergence_analysis
from kiln.runs.doctor.findings import finding, finite

VAL_MARGIN_ABS, VAL_MARGIN_REL = 0.05, 0.03  # eval_regression: val loss up by > 0.05 nats and > 3%
OVERFIT_GAP_RATIO, OVERFIT_GAP_ABS = 0.6, 0.5  # train loss < 0.6 x val loss and > 0.5 nats below it
OVERFIT_HEALTHY = 0.95  # ... where train >= 0.95 x val, the gap had not opened yet
SUITE_DROP_ABS, SUITE_DROP_REL = 0.02, 0.10  # a suite metric worse by > 0.02 and > 10%
HIGHER_IS_BETTER = ("acc", "acc_norm", "top5_acc", "masked_acc", "bleu", "chrf", "next_line_exact")
LOWER_IS_BETTER = ("loss", "ppl", "bits_per_byte", "masked_loss")


def overfit_analysis(ctx: Context) -> dict[str, Any] | None:
    if "overfit" not in ctx.cache:
        ctx.cache["overfit"] = _overfit(ctx)
    return ctx.cache["overfit"]


def _overfit(ctx: Context) -> dict[str, Any] | None:
    evals = [(e["step"], e["val_loss"]) for e in ctx.evals if finite(e.get("val_loss"))]
    if not evals:
        return None
    b = min(range(len(evals)), key=lambda i: evals[i][1])
    (best_step, best), (last_step, last) = evals[b], evals[-1]
    train_best, train_last = ctx.train_loss_near(best_step), ctx.train_loss_near(last_step)
    if train_best is None or train_last is None:
        return None
    rising = (
        len(evals) >= 3
        and len(evals) - 1 - b >= 2
        and train_last < train_best - 0.02
        and last - best > max(VAL_MARGIN_ABS / 2, VAL_MARGIN_REL / 2 * best)
    )
    gap = train_last < OVERFIT_GAP_RATIO * last and last - train_last > OVERFIT_GAP_ABS
    if not (rising or gap):
        return None
    fork_step = best_step
    if not rising:  # memorising: go back to the last evaluation before the gap opened
        fork_step = evals[0][0]
        for step, val in evals:
            train = ctx.train_loss_near(step)
            if train is None or train < OVERFIT_HEALTHY * val:
                break
            fork_step = step
    return {
        "best_step": best_step,
        "best_val_loss": best,
        "last_step": last_step,
        "last_val_loss": last,
        "train_loss_at_best": train_best,
        "train_loss_at_last": train_last,
        "val_rising": rising,
        "train_far_below_val": gap,
        "fork_step": fork_step,
    }


def overfitting(ctx: Context) -> list[dict[str, Any]]:
    d = overfit_analysis(ctx)
    if d is None or divergence_analysis(ctx):
        return []
    sets = [f"model.dropout={round(min((ctx.cfg.model.dropout if ctx.cfg else 0.0) + 0.1, 0.5), 2)}"]
    if d["val_rising"]:
        summary = (
            f"validation loss rose from {d['best_val_loss']:.3f} (step {d['best_step']}) to "
            f"{d['last_val_loss']:.3f} while the training loss fell to {d['train_loss_at_last']:.3f}"
        )
        why = (
            f"the best model is step {d['best_step']}'s (kiln export {shlex.quote(str(ctx.run.path))} --step "
            f"{d['best_step']} --out model.safetensors); to train on from there, more dropout regularises it"
        )
    else:
        summary = (
            f"training loss {d['train_loss_at_last']:.3f} is far below the validation loss "
            f"{d['last_val_loss']:.3f}: the model memorises repeated data"
        )
        why = f"goes back to step {d['fork_step']}, before the training loss parted from the validation loss"
    first = d["best_step"] if d["val_rising"] else d["fork_step"]
    return [
        finding(
            "overfitting",
            "warning",
            (first, d["last_step"]),
            d,
            summary,
            ctx.fork_remedy(
                "overfitting", d["fork_step"], sets, why + "; more (or less repeated) data is the real cure"
            ),
        )
    ]


def _direction(metric: str) -> int:
    name = metric.rsplit("/", 1)[-1]
    return 1 if name in HIGHER_IS_BETTER else -1 if name in LOWER_IS_BETTER else 0


def eval_regression(ctx: Context) -> list[dict[str, Any]]:
    """The largest rise of the validation loss between two evaluations (a warning), or drop of a
    suite metric whose direction is known (information); not what a divergence or overfitting explains."""
    d, overfit = divergence_analysis(ctx), overfit_analysis(ctx)
    end = d["rise"] if d else math.inf
    out = []
    for metric in ["val_loss"] + sorted({k for e in ctx.evals for k in e if "/" in k and _direction(k)}):
        if metric == "val_loss" and overfit and overfit["val_rising"]:
            continue
        sign = 1 if metric == "val_loss" else -_direction(metric)  # + : a rise is bad
        rel = VAL_MARGIN_REL if sign > 0 else SUITE_DROP_REL
        floor = VAL_MARGIN_ABS if metric == "val_loss" else SUITE_DROP_ABS
        series = [(e["step"], e[metric]) for e in ctx.evals if finite(e.get(metric)) and e["step"] <= end]
        bad = [
            (sign * (v1 - v0), s0, v0, s1, v1)
            for (s0, v0), (s1, v1) in zip(series, series[1:])
            if sign * (v1 - v0) > max(floor, rel * abs(v0))
        ]
        if not bad:
            continue
        _, s0, v0, s1, v1 = max(bad)
        evidence = {"metric": metric, "before": v0, "after": v1, "before_step": s0, "after_step": s1}
        if metric != "val_loss":
            out.append(
                finding(
                    "eval_regression",
                    "info",
                    (s0, s1),
                    evidence,
                    f"{metric} {'rose' if sign > 0 else 'fell'} from {v0:.4g} (step {s0}) to {v1:.4g} (step {s1})",
                )
            )
            continue
        lr, how = ctx.lower_lr(s1)
        out.append(
            finding(
                "eval_regression",
                "warning",
                (s0, s1),
                evidence,
                f"validation loss rose from {v0:.3f} (step {s0}) to {v1:.3f} (step {s1})",
                ctx.fork_remedy(
                    "eval_regression",
                    s0,
                    [f"optim.lr={lr}"],
                    f"retrains from the better evaluation's checkpoint with peak optim.lr = {lr} ({how})",
                ),
            )
        )
    return out
