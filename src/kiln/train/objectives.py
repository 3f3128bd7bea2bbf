"""Training objectives: how a window of tokens becomes (inputs, targets, loss) for a model family.

An objective is a registered class; `train.objective` selects it and its `family` names the
model family it needs (checked when the config is validated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kiln.data.tokenizer import KilnTokenizer

IGNORE = -100  # target id that contributes no loss


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) token ids, IGNORE where no loss is taken


class Objective:
    name: ClassVar[str]
    family: ClassVar[str]  # model family this objective trains

    def __init__(self, tokenizer: KilnTokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    def make_batch(self, windows: torch.Tensor, step: int, seed: int) -> Batch:
        raise NotImplementedError

    @staticmethod
    def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over non-ignored targets, in float32; the caller divides by the
        global count of predicted tokens so gradient accumulation and data parallelism agree."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                               reduction="sum")


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


@register_objective
class Causal(Objective):
    """Next-token prediction: inputs are the first T tokens of a window, targets the last T."""

    name = "causal"
    family = "decoder"

    def make_batch(self, windows: torch.Tensor, step: int, seed: int) -> Batch:
        return Batch(windows[:, :-1], windows[:, 1:])
