"""The doctor's rules for a run that is not learning: a plateau (the loss stalls with the
learning rate too low, or cut while running) and an end at the context-free baseline.

A causal model that has learned nothing but token frequencies ends at the validation set's
unigram entropy (summary.json's `unigram_entropy`); a masked model that has learned nothing
predicts the most frequent masked token (`majority_baseline`). When a run ends at or near that
baseline and its loss rose above where it started during warm-up (a learning rate so high that
the first updates wrecked the weights, after which training settles on token frequencies and
never leaves them), the finding is critical and the remedy is a fresh attempt at a lower LR: the
wrecked weights are not worth forking. Without the early rise a short run near the baseline is
just early in training; only one that has seen Chinchilla's 20 tokens per parameter (Hoffmann et
al., 2022), enough to be well past the baseline, is a warning, with no remedy the doctor can name
(the plateau rule names a too-low LR when it sees one).
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any

import numpy as np

import kiln.runs.doctor.series as series
from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import finding, finite, fmt_lr

TINY_LR = 1e-5  # a configured peak LR at or below this is too low for pretraining
LR_CUT = 0.05  # logged LR below 5% of the schedule's: the LR was cut while running
PLATEAU_DROP = 0.03  # plateau: the loss fell by less than 3% over the segment
NEAR_ENTROPY = 0.92  # a causal run ends "near the baseline" at >= 92% of the unigram entropy
NEAR_MAJORITY = 1.25  # a masked run at <= 1.25x the majority baseline's accuracy
MIN_STEPS_AFTER_RISE = 50  # steps past warm-up before a wrecked start is judged by where it ended
TOKENS_PER_PARAM = 20.0  # without an early rise: tokens seen per parameter before the end is judged
EARLY_RISE = 0.25  # the loss in warm-up this many nats above where it started ...
EARLY_RISE_SHARE = 0.03  # ... and this share above it


def plateau(ctx: Context) -> list[dict[str, Any]]:
    if ctx.cfg is None:
        return []
    cfg_lr = ctx.cfg.optim.lr
    t = ctx.table
    keep = (ctx.steps > ctx.warmup) & t.finite("loss") & t.finite("lr")
    steps, losses, lrs = ctx.steps[keep], t.numbers("loss")[keep], t.numbers("lr")[keep]
    if len(steps) < 10:
        return []

    def tiny(step: int, lr: float) -> bool:
        f = ctx.schedule_factor(step)
        return cfg_lr <= TINY_LR or (f is not None and lr < LR_CUT * cfg_lr * f)

    start = len(steps)
    if cfg_lr <= TINY_LR:
        start = 0  # every point is tiny
    while start > 0 and tiny(int(steps[start - 1]), float(lrs[start - 1])):
        start -= 1
    if len(steps) - start < max(10, len(steps) // 4):
        return []
    losses, lrs = losses[start:], lrs[start:]
    k = max(3, len(losses) // 5)
    early, late = series.median(losses[:k]), series.median(losses[-k:])
    drop = (early - late) / early if early > 0 else 0.0
    if drop >= PLATEAU_DROP:
        return []
    first, last = int(steps[start]), int(steps[-1])
    evals = [e["val_loss"] for e in ctx.evals if first <= e["step"] <= last and finite(e.get("val_loss"))]
    lr_median = series.median(lrs)
    eff = ctx.effective_peak(first) or cfg_lr
    if cfg_lr > TINY_LR and eff < LR_CUT * cfg_lr:  # cut while running: back to the configured LR
        new, how = cfg_lr, f"the configured optim.lr; it ran at {eff:.2g}"
    else:
        new, how = float(fmt_lr(10 * eff)), f"x10 of {eff:.2g}"
    evidence = {
        "loss_drop": drop,
        "loss_start": early,
        "loss_end": late,
        "lr": lr_median,
        "optim_lr": cfg_lr,
        "effective_peak_lr": eff,
    }
    if len(evals) >= 2:
        evidence["val_loss_drop"] = (evals[0] - evals[-1]) / evals[0]
    summary = (
        f"the loss fell by {max(drop, 0.0):.1%} over steps {first}-{last} with the LR at ~{lr_median:.2g} "
        f"(peak {eff:.2g}): the learning rate is too low"
    )
    why = f"retrains the stalled steps with peak optim.lr = {new} ({how})"
    return [
        finding(
            "plateau",
            "warning",
            (first, last),
            evidence,
            summary,
            ctx.fork_remedy("plateau", first, [f"optim.lr={new}"], why),
        )
    ]


def _outcome(ctx: Context, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The run's end against its baseline, or None when it records no baseline or evaluation."""
    last = ctx.evals[-1] if ctx.evals else summary
    if finite(last.get("val_masked_acc")) and finite(last.get("majority_baseline")):
        acc, base = float(last["val_masked_acc"]), float(last["majority_baseline"])
        return {
            "measure": "val_masked_acc",
            "value": acc,
            "majority_baseline": base,
            "near": acc <= NEAR_MAJORITY * base,
            "text": f"masked accuracy {acc:.3f} against the majority baseline's {base:.3f}",
        }
    entropy = float(summary["unigram_entropy"]) if finite(summary.get("unigram_entropy")) else 0.0
    if finite(last.get("val_loss")) and entropy > 0:
        loss = float(last["val_loss"])
        return {
            "measure": "val_loss",
            "value": loss,
            "unigram_entropy": entropy,
            "of_entropy": loss / entropy,
            "near": loss >= NEAR_ENTROPY * entropy,
            "text": f"validation loss {loss:.3f}, {loss / entropy:.2f} of the unigram entropy {entropy:.3f}",
        }
    return None


def _early_rise(ctx: Context) -> dict[str, Any] | None:
    """The loss during warm-up above where it started: the first logged loss, or ln(vocabulary)
    (an initialised model predicts about uniformly) when the first record comes later."""
    steps, losses = ctx.loss_points()
    if not len(steps) or ctx.cfg is None:
        return None
    first_step, first_loss = int(steps[0]), float(losses[0])
    window = max(ctx.warmup, first_step)
    early = losses[: int(np.searchsorted(steps, window, side="right"))].tolist() or [first_loss]
    start = first_loss if first_step <= 1 else min(first_loss, math.log(ctx.cfg.data.vocab_size))
    # a running median of three: one noisy step is not a rise
    peak = max(median(early[max(0, i - 1) : i + 2]) for i in range(len(early)))
    if peak - start < max(EARLY_RISE, EARLY_RISE_SHARE * start):
        return None
    return {"start_loss": start, "warmup_peak_loss": peak, "warmup_end_step": window}


def no_learning(ctx: Context) -> list[dict[str, Any]]:
    if ctx.cfg is None or ctx.last_step is None:
        return []
    summary = ctx.run.summary() or {}
    outcome = _outcome(ctx, summary)
    if outcome is None or not outcome["near"]:
        return []
    steps = ctx.last_step
    counted = np.flatnonzero(ctx.table.finite("tokens"))
    tokens = ctx.table.value("tokens", int(counted[-1])) if len(counted) else 0
    params = summary.get("params")
    if not params:  # an unfinished run: count them from its config
        from kiln.scaling.flops import param_count

        params = param_count(ctx.cfg.model, ctx.cfg.data.vocab_size)
    rise = _early_rise(ctx)
    if rise is None and tokens < TOKENS_PER_PARAM * params:
        return []  # early in training: near the baseline is where a run starts
    if rise is not None and steps - ctx.warmup < MIN_STEPS_AFTER_RISE:
        return []
    evidence = {k: v for k, v in outcome.items() if k not in ("near", "text")}
    evidence.update(steps=steps, tokens=tokens, tokens_per_param=tokens / params)
    evidence["optim_lr"] = ctx.cfg.optim.lr
    span = (int(ctx.steps[0]), steps)
    if rise is None:
        said = (
            f"after {steps} steps ({tokens / params:.0f} tokens per parameter) the model ends near its "
            f"context-free baseline ({outcome['text']}): it has learned little beyond token frequencies"
        )
        return [finding("no_learning", "warning", span, evidence, said)]
    evidence.update(rise)
    lr, how = ctx.lower_lr(rise["warmup_end_step"])
    said = (
        f"the loss rose from {rise['start_loss']:.2f} to {rise['warmup_peak_loss']:.2f} during warm-up and the "
        f"run ends at its context-free baseline ({outcome['text']}): a learning rate of "
        f"{fmt_lr(ctx.cfg.optim.lr)} wrecked the weights at the start and the model learned only token frequencies"
    )
    why = f"a fresh attempt with peak optim.lr = {lr} ({how}); the wrecked weights are not worth forking"
    return [
        finding(
            "no_learning",
            "critical",
            span,
            evidence,
            said,
            ctx.fork_remedy("no_learning", 0, [f"optim.lr={lr}"], why),
        )
    ]
