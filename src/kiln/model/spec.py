"""`ModelSpec`: everything Kiln needs to know about one model family, in one object.

The trainer, the parallel layer, the FLOP and memory accounting and the monitoring callbacks
never name a model's attributes; they ask the family's spec. A family registered from a plugin
(`kiln.model.registry.register_model_family`) needs only `name` and `build`: every other slot
has a generic default (no tensor or pipeline parallelism, FSDP over the whole model, counts
taken from the built model), so it trains, checkpoints and resumes like the built-ins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kiln.config import Config, ModelConfig
from kiln.model.init import InitRule

Blocks = Callable[[nn.Module], list[tuple[str, nn.Module]]]


VOCAB_MULTIPLE = 64  # embeddings are padded to a multiple of this, so matrix shapes suit the hardware


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def default_init_rule(name: str, ndim: int, cfg: ModelConfig) -> tuple[str, float]:
    """Matrices and embeddings from N(0, init_std); biases zero; other vectors (norm gains) one."""
    if name.rsplit(".", 1)[-1] == "bias":
        return "zeros", 0.0
    if ndim == 1:
        return "ones", 0.0
    return "normal", cfg.init_std


def no_checks(cfg: Config) -> None:
    """The default family validation: nothing beyond the config layer's own checks."""


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes one block keeps for its backward pass, with and without activation checkpointing."""

    stored: float  # everything the block saves (no checkpointing)
    inputs: float  # only the block's input (recomputed in backward)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[ModelConfig, int], nn.Module]  # (config, padded vocabulary) -> model
    validate: Callable[[Config], None] = no_checks  # family-specific config checks; raise ConfigError
    blocks: Blocks | None = None  # the repeated blocks: FSDP units, activation checkpointing, per-block compile
    init_rule: InitRule = default_init_rule
    # the tensor-parallel plan: (model, tp DeviceMesh) -> None, or a plan's name in kiln.parallel.plans
    tensor_parallel: Callable[[nn.Module, Any], None] | str | None = None
    pipeline_stage: Callable[..., nn.Module] | None = None  # (model, stage, stages[, layers per stage]) -> stage
    count_params: Callable[[ModelConfig, int], int] | None = None  # all parameters (vocab as given)
    flops_per_token: Callable[[ModelConfig, int], float] | None = None  # training FLOPs per token
    activation_bytes: Callable[[ModelConfig, int, int], ActivationBytes] | None = None  # (cfg, micro, bytes/value)
    monitor_modules: tuple[str, ...] = ()  # default module-name globs for the layer_stats callback
    attention_logits: Callable[[nn.Module, tuple], torch.Tensor] | None = None  # (module, forward args) -> logits
    attention_modules: tuple[str, ...] = ()  # globs of the modules `attention_logits` understands
    causal: bool = True  # predicts each token from its left context (generates text); False: bidirectional
    # its Hugging Face adapter (kiln.interop.hf.HFAdapter) or a built-in one's name in kiln.interop.adapters
    hf_adapter: Any = None
    expert_modules: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]] | None = None  # (MoE block, experts)
    # files a fresh start reads besides model.init_from: {dotted key: path} (a frozen image encoder)
    start_weights: Callable[[ModelConfig], dict[str, str]] | None = None

    def start_files(self, cfg: ModelConfig) -> dict[str, str]:
        return self.start_weights(cfg) if self.start_weights is not None else {}

    # ------------------------------------------------------------- generic defaults
    def params(self, cfg: ModelConfig, vocab_size: int) -> int:
        if self.count_params is not None:
            return self.count_params(cfg, vocab_size)
        return sum(p.numel() for p in self._meta_model(cfg, vocab_size).parameters())

    def flops(self, cfg: ModelConfig, vocab_size: int) -> float:
        """Training FLOPs per token; without a family formula, 6 x the parameters of matrices
        (every weight with two or more dimensions takes part in one product per token)."""
        if self.flops_per_token is not None:
            return self.flops_per_token(cfg, vocab_size)
        model = self._meta_model(cfg, vocab_size)
        return 6.0 * sum(p.numel() for p in model.parameters() if p.dim() >= 2)

    def block_list(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return self.blocks(model) if self.blocks is not None else []

    def _meta_model(self, cfg: ModelConfig, vocab_size: int) -> nn.Module:
        with torch.device("meta"):
            return self.build(cfg, vocab_size)


def normal_std_for_depth(std: float, n_layers: int) -> float:
    """GPT-2's scaled init for projections into the residual stream: std / sqrt(2 L)."""
    return std / math.sqrt(2 * n_layers)
