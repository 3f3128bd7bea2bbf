"""Held-out language-model metrics: loss, perplexity and top-1 accuracy of the predicted tokens."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from kiln.train.objectives import IGNORE, Objective


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: torch.Tensor, objective: Objective, batch_size: int,
                device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                seed: int = 0, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and accuracy over `windows`; deterministic for `seed`.

    `reduce` sums a tensor over data-parallel ranks when each rank holds part of the windows.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for i in range(0, len(windows), batch_size):
        batch = objective.make_batch(windows[i:i + batch_size], step=i, seed=seed)
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        with autocast():
            logits = model(inputs)
        mask = targets != IGNORE
        totals[0] += objective.loss_sum(logits, targets).double()
        totals[1] += ((logits.argmax(-1) == targets) & mask).sum()
        totals[2] += mask.sum()
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct / max(count, 1),
            "val_tokens": int(count)}
