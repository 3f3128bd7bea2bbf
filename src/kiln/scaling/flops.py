"""FLOPs per token and parameter counts from the model config, for MFU and the scaling accounting.

Both come from the model family's `ModelSpec` (for the transformer: 6 N + 12 L d T, PaLM appendix
B, see kiln.model.transformer_spec); MFU is achieved FLOP/s over the device's peak (kiln.hardware).
"""

from __future__ import annotations

from kiln.config import ModelConfig
from kiln.model.registry import get_spec, padded_vocab


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training (forward + backward) FLOPs per token, as the model family counts them."""
    return get_spec(cfg.family).flops(cfg, padded_vocab(vocab_size))


def param_count(cfg: ModelConfig, vocab_size: int) -> int:
    """All parameters of the model for a tokenizer of `vocab_size` (embedding padded)."""
    return get_spec(cfg.family).params(cfg, padded_vocab(vocab_size))
