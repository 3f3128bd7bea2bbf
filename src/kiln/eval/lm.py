"""Held-out language-model metrics: loss, perplexity and top-1 accuracy of the predicted tokens."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from kiln.eval.suites import EvalContext, register_suite
from kiln.train.objectives import EVAL_STEP, IGNORE, Objective


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: torch.Tensor, objective: Objective, batch_size: int,
                device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                seed: int = 0, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                first_index: int = 0) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and accuracy over `windows`; deterministic for `seed`.

    `reduce` sums a tensor over data-parallel ranks when each rank holds part of the windows, and
    `first_index` is then the index of this rank's first window among all of them (a masked
    objective draws each window's masks from its index, so every evaluation and every layout
    masks the same positions). For a masked objective the metrics add `val_masked_acc` (the same
    as `val_acc`: accuracy at the masked positions) and `majority_baseline`, the accuracy of always
    predicting the most frequent token among those positions.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    target_counts = torch.zeros(objective.vocab_size if objective.masked else 0, dtype=torch.float64, device=device)
    for i in range(0, len(windows), batch_size):
        batch = objective.make_batch(windows[i:i + batch_size], step=EVAL_STEP, seed=seed, first_index=first_index + i)
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        with autocast():
            logits = model(inputs)
        tally_predictions(totals, logits, targets, objective)
        if objective.masked:
            target_counts += torch.bincount(targets[targets != IGNORE], minlength=objective.vocab_size)
    if reduce is not None:
        totals = reduce(totals)
        target_counts = reduce(target_counts) if objective.masked else target_counts
    model.train(was_training)
    metrics = lm_metrics(totals)
    if objective.masked:
        metrics["val_masked_acc"] = metrics["val_acc"]
        metrics["majority_baseline"] = target_counts.max().item() / max(metrics["val_tokens"], 1)
    return metrics

def tally_predictions(totals: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                      objective: Objective) -> torch.Tensor:
    """Add (loss sum, correct, count) of one batch to `totals`; returns the loss sum."""
    mask = targets != IGNORE
    loss = objective.loss_sum(logits, targets)
    totals[0] += loss.double()
    totals[1] += ((logits.argmax(-1) == targets) & mask).sum()
    totals[2] += mask.sum()
    return loss


def lm_metrics(totals: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, count = totals.tolist()
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct / max(count, 1),
            "val_tokens": int(count)}


@torch.no_grad()
def evaluate_lm_pipeline(trainer) -> dict[str, float]:
    """`evaluate_lm` for a model split into pipeline stages: the schedule's forward-only pass
    runs the stages, and the trainer's loss function tallies on the last stage."""
    from kiln.parallel import pipeline as pp

    totals = torch.zeros(3, dtype=torch.float64, device=trainer.device)
    first, last = pp.has_first_stage(trainer.stage_ids), pp.has_last_stage(trainer.stage_ids, trainer.n_stages)
    n_micro = trainer.cfg.parallel.pp_microbatches
    step = n_micro * max(1, len(trainer.val) // n_micro // n_micro)
    trainer.eval_totals = totals
    try:
        for part in trainer.parts:
            part.eval()
        for i in range(0, len(trainer.val) - step + 1, step):
            batch = trainer.objective.make_batch(trainer.val[i:i + step], step=EVAL_STEP, seed=trainer.cfg.train.seed,
                                                 first_index=trainer.par.dp[0] * len(trainer.val) + i)
            with trainer.autocast():
                trainer.schedule.eval(*((batch.inputs.to(trainer.device),) if first else ()),
                                      target=batch.targets.to(trainer.device) if last else None)
    finally:
        trainer.eval_totals = None
        for part in trainer.parts:
            part.train()
    return lm_metrics(trainer.par.data_sum(totals))


# --------------------------------------------------------------------------- the `lm` suite

@register_suite("lm", options={"windows": 0})
@torch.no_grad()
def lm_suite(ctx: EvalContext) -> dict[str, float]:
    """Held-out loss, perplexity, top-1/top-5 accuracy and bits per byte (masked tokens for encoders)."""
    from kiln.data.loader import TokenWindows, eval_windows
    from kiln.eval.common import token_byte_lengths
    from kiln.train.objectives import build_objective

    cfg = ctx.cfg
    n = ctx.options.get("windows") or cfg.eval.batches * cfg.global_batch  # default: the trainer's windows
    windows = eval_windows(TokenWindows(ctx.data.split("val"), cfg.model.seq_len, "validation"), n)
    objective = build_objective(cfg, ctx.tokenizer, ctx.vocab_size)
    V = ctx.vocab_size
    nbytes = torch.from_numpy(token_byte_lengths(ctx.tokenizer)).to(ctx.device)
    totals = torch.zeros(5, dtype=torch.float64, device=ctx.device)  # nats, top-1, top-5, tokens, bytes
    for i in range(0, len(windows), ctx.batch_size):
        # masks are drawn per window index, so a masked model sees the trainer's evaluation masks
        # whatever the batch size
        batch = objective.make_batch(windows[i:i + ctx.batch_size], step=EVAL_STEP, seed=cfg.train.seed,
                                     first_index=i)
        inputs, targets = batch.inputs.to(ctx.device), batch.targets.to(ctx.device)
        with ctx.autocast():
            logits = ctx.model(inputs)
        mask = targets != IGNORE
        safe = targets.clamp(min=0)
        hits = logits[..., :V].topk(5, dim=-1).indices == safe[..., None]  # (B, T, 5)
        totals[0] += objective.loss_sum(logits, targets).double()
        totals[1] += (hits[..., 0] & mask).sum()
        totals[2] += (hits.any(-1) & mask).sum()
        totals[3] += mask.sum()
        totals[4] += nbytes[safe][mask].sum()
    nats, top1, top5, count, n_bytes = totals.tolist()
    loss = nats / max(count, 1)
    p = "masked_" if ctx.is_encoder else ""
    return {f"{p}loss": loss, f"{p}ppl": math.exp(min(loss, 50.0)), f"{p}acc": top1 / max(count, 1),
            f"{p}top5_acc": top5 / max(count, 1), "bits_per_byte": nats / (math.log(2) * max(n_bytes, 1)),
            f"{p}tokens": int(count), "bytes": int(n_bytes)}
