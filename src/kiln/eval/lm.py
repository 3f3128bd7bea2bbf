"""Held-out language-model metrics: loss, perplexity and top-1 accuracy of the predicted tokens.

`evaluate_windows` takes a narrow `eval_step(inputs, targets) -> (loss sum, correct, count)` (a
plain model's forward, or a pipeline schedule's forward-only pass) and this rank's share of the
validation windows; every layout evaluates the same windows (shares are padded, and padding
predicts nothing), so `val_loss` never depends on the layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.data.loader import WindowShare, share_windows
from kiln.errors import KilnError
from kiln.eval.suites import EvalContext, register_suite
from kiln.objectives import EVAL_STEP, IGNORE, Objective, true_vocab

EvalStep = Callable[..., torch.Tensor]  # (inputs, targets, **extras) -> (loss sum, correct, count)


def tally_predictions(
    totals: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, objective: Objective
) -> torch.Tensor:
    """Add (loss sum, correct, count) of one batch to `totals`; returns the loss sum."""
    mask = targets != IGNORE
    loss = objective.loss_sum(logits, targets)
    totals[0] += loss.double()
    totals[1] += ((true_vocab(logits, objective.vocab_size).argmax(-1) == targets) & mask).sum()
    totals[2] += mask.sum()
    return loss


def lm_metrics(totals: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, count = totals.tolist()
    loss = loss_sum / max(count, 1)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_acc": correct / max(count, 1),
        "val_tokens": int(count),
    }


@torch.no_grad()
def evaluate_windows(
    eval_step: EvalStep,
    share: WindowShare,
    objective: Objective,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    holds_loss: bool = True,
) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and accuracy over the validation windows.

    `share` is this rank's part of them; `reduce` sums a tensor over data-parallel ranks (and
    divides out the copies tensor and pipeline ranks make); `holds_loss` is False on pipeline
    ranks without the last stage. A masked objective draws each window's masks from its global
    index, so every evaluation and every layout masks the same positions; its metrics add
    `val_masked_acc` (= `val_acc`, accuracy at the masked positions) and `majority_baseline`,
    the accuracy of always predicting the most frequent token among those positions.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    target_counts = torch.zeros(objective.vocab_size if objective.masked else 0, dtype=torch.float64, device=device)
    windows = share.windows
    for i in range(0, len(windows), batch_size):
        batch = objective.make_batch(
            windows[i : i + batch_size], step=EVAL_STEP, seed=seed, first_index=share.first_index + i
        )
        targets = batch.targets.clone()
        targets[max(0, share.valid - i) :] = IGNORE  # padding rows predict nothing
        totals += eval_step(batch.inputs, targets, **batch.extras)
        if objective.masked and holds_loss:
            kept = targets[targets != IGNORE].to(device)
            target_counts += torch.bincount(kept, minlength=objective.vocab_size)
    if reduce is not None:
        totals = reduce(totals)
        target_counts = reduce(target_counts) if objective.masked else target_counts
    metrics = lm_metrics(totals)
    if objective.masked:
        metrics["val_masked_acc"] = metrics["val_acc"]
        metrics["majority_baseline"] = target_counts.max().item() / max(metrics["val_tokens"], 1)
    return metrics


def model_eval_step(
    model: nn.Module,
    objective: Objective,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> EvalStep:
    """The `eval_step` of a whole model in this process."""

    @torch.no_grad()
    def step(inputs: torch.Tensor, targets: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        with autocast():
            logits = model(inputs.to(device), **{k: v.to(device) for k, v in extras.items()})
        tally_predictions(totals, logits, targets.to(device), objective)
        return totals

    return step


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    windows: torch.Tensor,
    objective: Objective,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    seed: int = 0,
) -> dict[str, float]:
    """`evaluate_windows` for a whole model in one process over all of `windows`."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_windows(
            model_eval_step(model, objective, device, autocast),
            share_windows(windows, 0, 1),
            objective,
            batch_size,
            device,
            seed=seed,
        )
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- the `lm` suite


def text_windows(path: str, tokenizer: Any, seq_len: int) -> list[torch.Tensor]:
    """A plain-text file as windows that predict each of its tokens once (all but the first):
    non-overlapping spans of `seq_len` predictions, each window beginning with the token the
    previous one ended on; the last, shorter one on its own. Batches of full windows, then it."""
    from kiln.errors import DataError

    try:  # the text's own characters, whatever they are (bits per byte are of its UTF-8 bytes)
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"lm.text = {path!r} is not a readable UTF-8 text file ({e})") from None
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    if len(ids) < 2:
        raise DataError(f"lm.text = {path!r} holds fewer than two tokens; give it some text")
    full = (len(ids) - 1) // seq_len
    out = [ids[: full * seq_len + 1].unfold(0, seq_len + 1, seq_len)] if full else []
    if full * seq_len + 1 < len(ids):
        out.append(ids[full * seq_len :][None])
    return out


@register_suite("lm", options={"windows": 0, "text": ""})
@torch.no_grad()
def lm_suite(ctx: EvalContext) -> dict[str, float]:
    """Held-out loss, perplexity, top-1/top-5 accuracy and bits per byte (masked tokens for encoders);
    `text`: of every token of a plain-text file instead of the validation split."""
    from kiln.data.loader import TokenWindows, eval_windows
    from kiln.data.multimodal.loader import validation_windows
    from kiln.data.multimodal.prepare import MultimodalPrepared
    from kiln.eval.common import token_byte_lengths
    from kiln.objectives import build_objective

    cfg = ctx.cfg
    n = ctx.options.get("windows") or cfg.eval.batches * cfg.global_batch  # default: the trainer's windows
    text = ctx.options.get("text")
    image_text = not text and isinstance(ctx.data, MultimodalPrepared)
    if text:
        if ctx.is_encoder:
            raise KilnError("lm.text scores a text left to right; a masked (encoder) model has no such loss")
        parts = text_windows(text, ctx.tokenizer, cfg.model.seq_len)
    elif image_text:
        sets = validation_windows(cfg, ctx.data, n)
        parts = [sets[""]]
    else:
        parts = [eval_windows(TokenWindows(ctx.data.split("val"), cfg.model.seq_len, "validation"), n)]
    objective = build_objective(cfg, ctx.tokenizer, ctx.vocab_size)
    V = ctx.vocab_size
    nbytes = torch.from_numpy(token_byte_lengths(ctx.tokenizer)).to(ctx.device)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # nats, top-1, tokens (as the trainer)
    extra = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # top-5, bytes
    batches = [(part, i) for part in parts for i in range(0, len(part), ctx.batch_size)]
    for windows, i in batches:
        # masks are drawn per window index, so a masked model sees the trainer's evaluation masks
        # whatever the batch size
        batch = objective.make_batch(
            windows[i : i + ctx.batch_size], step=EVAL_STEP, seed=cfg.train.seed, first_index=i
        )
        inputs, targets = batch.inputs.to(ctx.device), batch.targets.to(ctx.device)
        with ctx.autocast():
            logits = ctx.model(inputs, **{k: v.to(ctx.device) for k, v in batch.extras.items()})
        tally_predictions(totals, logits, targets, objective)
        mask = targets != IGNORE
        safe = targets.clamp(min=0)
        top5 = logits[..., :V].topk(5, dim=-1).indices == safe[..., None]  # (B, T, 5)
        extra[0] += (top5.any(-1) & mask).sum()
        extra[1] += nbytes[safe][mask].sum()
    nats, top1, count = totals.tolist()
    top5, n_bytes = extra.tolist()
    loss = nats / max(count, 1)
    p = "masked_" if ctx.is_encoder else ""
    if image_text:  # the same captions with the images withheld
        text_only = evaluate_lm(
            ctx.model, sets["text_only"], objective, ctx.batch_size, ctx.device, ctx.autocast, seed=cfg.train.seed
        )
        extra_metrics = {"text_only_loss": text_only["val_loss"], "text_only_ppl": text_only["val_ppl"]}
    else:
        extra_metrics = {}
    return {
        **extra_metrics,
        f"{p}loss": loss,
        f"{p}ppl": math.exp(min(loss, 50.0)),
        f"{p}acc": top1 / max(count, 1),
        f"{p}top5_acc": top5 / max(count, 1),
        "bits_per_byte": nats / (math.log(2) * max(n_bytes, 1)),
        f"{p}tokens": int(count),
        "bytes": int(n_bytes),
    }
