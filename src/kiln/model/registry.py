"""Model families by name: `model.family` selects a builder `(ModelConfig, vocab_size) -> nn.Module`."""

from __future__ import annotations

from typing import Callable

from torch import nn

from kiln.config import ModelConfig
from kiln.model.decoder import Decoder
from kiln.model.encoder import Encoder

ModelBuilder = Callable[[ModelConfig, int], nn.Module]
MODELS: dict[str, ModelBuilder] = {"decoder": Decoder, "encoder": Encoder}
VOCAB_MULTIPLE = 64  # pad the embedding so matrix shapes stay friendly to the hardware


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return wrap


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """An uninitialised-or-initialised model (call `init_weights()` after moving off the meta device)."""
    return MODELS[cfg.family](cfg, padded_vocab(vocab_size))
