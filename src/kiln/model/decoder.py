"""GPT-style decoder: token (+ learned position) embedding, causal pre-norm blocks, LM head.

Flavours come from config: `gpt2` (learned positions, LayerNorm, GELU, biases) and `llama`
(RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention). With tied embeddings the output
softmax uses the input embedding matrix e(x).

Stages of a pipeline keep only some blocks: `tok_emb`, `norm` and `head` may be None, and
`layers` is a ModuleDict keyed by the original layer index so parameter names do not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.model import mup
from kiln.model.layers import Block, make_norm, rope_tables


class Transformer(nn.Module):
    """Shared trunk of the decoder and the encoder; `causal` picks the attention mask."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, causal: bool):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.causal = causal
        self.tok_emb: nn.Embedding | None = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb: nn.Embedding | None = nn.Embedding(cfg.positions, cfg.d_model) if cfg.pos == "learned" else None
        self.type_emb: nn.Embedding | None = (
            nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        )
        self.embed_norm: nn.Module | None = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, causal) for i in range(cfg.n_layers)})
        # post-norm blocks end normalised: no final norm (an Identity, since None marks a pipeline stage)
        self.norm: nn.Module | None = nn.Identity() if cfg.norm_position == "post" else make_norm(cfg)
        self.head: nn.Linear | None = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.output_mult = mup.output_mult(cfg)
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.positions, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE tables); needed after `to_empty()` from meta."""
        if self.rope_cos is not None:
            cos, sin = rope_tables(
                self.cfg.head_dim,
                self.rope_cos.shape[0],
                self.cfg.rope_theta,
                device=self.rope_cos.device,
            )
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.tok_emb is not None  # only a pipeline's first stage (which keeps tok_emb) embeds
        x = self.tok_emb(tokens)  # (B, T, d)
        if self.pos_emb is not None:
            # positions shaped (1, T) so that, under sequence parallelism, the output shards like x
            x = x + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device)[None])
        if self.type_emb is not None:  # every token is of type 0 (Kiln's windows are one segment)
            x = x + self.type_emb.weight[0]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.drop(x)

    def output_weight(self) -> torch.Tensor:
        if self.head is not None:
            return self.head.weight
        assert self.tok_emb is not None  # tied embeddings (no head): pipelines, which drop tok_emb, refuse ties
        return self.tok_emb.weight

    def forward(
        self,
        tokens: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """tokens (B, T) int64 -> logits (B, T, vocab); a middle pipeline stage maps hidden -> hidden.
        `head(hidden, output_matrix)`, when given, replaces the output projection (a loss that never
        materialises the logits: kiln.kernels.cross_entropy)."""
        x = self.embed(tokens) if self.tok_emb is not None else tokens
        return self.body(x, attn_mask, head)

    def body(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """The blocks, final norm and output layer on embedded inputs x (B, T, d)."""
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for block in self.layers.values():
            x = block(x, rope, attn_mask)
        if self.norm is None:
            return x
        x = self.norm(x)
        if self.output_mult is not None:  # µP's readout multiplier, before any loss head (kiln.model.mup)
            x = x * self.output_mult
        if head is not None:
            return head(x, self.output_weight())
        if self.head is not None:
            return self.head(x)
        return nn.functional.linear(x, self.output_weight())  # tied: softmax over e(x)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in (self.tok_emb, self.pos_emb, self.type_emb) if m is not None)
        return n


class Decoder(Transformer):
    """GPT-style causal language model."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, causal=True)
