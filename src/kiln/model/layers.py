"""Transformer building blocks: norms, rotary positions, attention through SDPA, MLPs.

Single-device PyTorch only; parallelism is applied from outside (kiln.parallel). Projections
are separate `nn.Linear`s (wq, wk, wv, wo; w1, w2, w3) so tensor parallelism can shard them
by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.config import swiglu_hidden as swiglu_hidden  # the formula lives with the config that resolves d_ff
from kiln.kernels import registry as kernels
from kiln.model import mup


class RMSNorm(nn.Module):
    """nn.RMSNorm's parameters and result, computed by the kernel registry (fused where it can)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(
    head_dim: int, seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim // 2), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, nh, T, hs) by the position angles."""
    return kernels.rope(x, cos, sin)


SHORT_CONTEXT = 512  # the explicit bf16 kernel materialises (T, T) scores: only for short contexts


def cpu_bf16_short(q: torch.Tensor) -> bool:
    """bf16 attention on CPU over a short context: SDPA's CPU flash kernel is slower there than
    two bf16 matrix products and a float32 softmax (45% at T=256, see BENCHMARKS.md). Everywhere
    else (GPUs, fp32, long contexts, masks, dropout) attention goes through SDPA."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= SHORT_CONTEXT


def bf16_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v (scale: 1 / sqrt(hs) unless given) with the softmax in float32;
    q (B, nh, T, hs), k/v (B, nkv, T, hs)."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each KV head among its query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)  # (B, nh, T, T)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.float().softmax(-1).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.causal = causal
        self.dropout = cfg.dropout
        self.scale = mup.attention_scale(cfg)  # None: SDPA's 1 / sqrt(head_dim); µP: sqrt(d0) / head_dim
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def _qk(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (model.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k

    @torch.no_grad()
    def logits(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pre-softmax scores (B, nh, T, T) this layer computes for `x`, in float32, -inf
        where masked. Not used by `forward` (SDPA never materialises them): monitoring calls it."""
        q, k = self._qk(x, rope)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * (self.scale or self.head_dim**-0.5)
        T = scores.shape[-1]
        if self.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask.bool(), float("-inf"))
        return scores

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k = self._qk(x, rope)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if cpu_bf16_short(q) and attn_mask is None and dropout == 0.0:
            y = bf16_attention(q, k, v, self.causal, self.scale)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout,
                is_causal=self.causal and attn_mask is None,
                enable_gqa=q.shape[1] != k.shape[1],
                scale=self.scale,
            )
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hs)
        return self.wo(y)


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ff_hidden
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int = 0):
        """The dense MLP of `cfg`, or (`hidden` given) one of that width without biases: an expert."""
        super().__init__()
        bias = cfg.bias and not hidden
        hidden = hidden or cfg.ff_hidden
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=bias)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=bias)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). With
    `model.post_norm` each sub-layer's output is normalised too before the residual add,
    x + norm'(attn(norm(x))) (the sandwich norm of Gemma 2; OLMo 2 keeps only the outer norm):
    the residual stream then grows by bounded steps whatever a sub-layer's output does. With
    `model.norm_position = "post"` the block is BERT's (and the original Transformer's):
    norm(x + attn(x)), then norm(x + mlp(x)); the same two norms, applied after the add."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.mlp_norm = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        self.norm_after_add = cfg.norm_position == "post"
        self.attn_post_norm = make_norm(cfg) if cfg.post_norm else None
        self.mlp_post_norm = make_norm(cfg) if cfg.post_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.norm_after_add:
            x = self.attn_norm(x + self.drop(self.attn(x, rope, attn_mask)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        h = self.attn(self.attn_norm(x), rope, attn_mask)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + self.drop(h)
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + self.drop(h)
