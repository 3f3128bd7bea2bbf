"""BERT-style encoder: the decoder's trunk with bidirectional attention, and a masked-LM head.

Every layer option of the decoder applies (norm, MLP, positions, GQA, qk-norm). The blocks are
pre-norm with a final norm by default (pre-norm trains stably without BERT's warm-up care);
`model.norm_position = "post"` with `embed_norm`, `type_vocab_size = 2`, learned positions and
`mlp = "gelu_exact"` is BERT exactly (the `bert-base` preset; it maps to BertForMaskedLM). The
head is BERT's: dense + GELU + norm, then the output projection, tied to the input embedding by
default, plus a per-token output bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.model.decoder import Transformer
from kiln.model.layers import make_norm


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = make_norm(cfg)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if cfg.bias else None

    def forward(self, x: torch.Tensor, output_weight: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))  # the exact GELU, as BERT's head
        logits = F.linear(x, output_weight)  # (B, T, vocab)
        # Added apart: F.linear's fused bias returns a view, which FSDP2 warns about at the output.
        return logits if self.bias is None else logits + self.bias


class Encoder(Transformer):
    """Bidirectional transformer for masked language modelling."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, causal=False)
        self.mlm_head = MLMHead(cfg, vocab_size)

    def forward(  # type: ignore[override]  # a masked LM's inputs differ from the decoder trunk's by design
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, predict: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab); with `predict` (N,) flat positions (into
        B x T), the logits of those positions only, (N, vocab): training predicts ~15% of the
        tokens, and the head over the vocabulary is most of the model's work per position.

        `padding_mask` (B, T) is True at real tokens and False at padding, which no position then
        attends to (the outputs at padded positions are meaningless). Kiln's training windows are
        packed and never padded; the mask is for batches of separate texts.
        """
        attn_mask = None if padding_mask is None else padding_mask.bool()[:, None, None, :]  # (B, 1, 1, T) keys
        x = self.embed(tokens)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for block in self.layers.values():
            x = block(x, rope, attn_mask)
        assert self.norm is not None  # only pipeline stages drop the norm, and the encoder has no pipeline
        x = self.norm(x)
        if predict is not None:  # integer positions, not a boolean mask: no count read back on the host
            x = x.flatten(0, 1)[predict]
        return self.mlm_head(x, self.output_weight())
