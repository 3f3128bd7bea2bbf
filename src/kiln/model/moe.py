"""Mixture-of-experts feed-forward block: a top-k router computed in float32, SwiGLU experts,
optional shared experts, capacity with token dropping (or dropless), and load balancing.

    x (N, d) ─ router (fp32) ─ scores (N, E) ─ top-k (+ balancing bias) ─ experts ─ weighted sum
                                                                          + shared experts (every token)

Load balancing, each switchable from `[model.moe]` (flat: `model.moe_*`):
- `aux_loss`: the Switch/GShard auxiliary loss E · Σᵢ fᵢ Pᵢ over the micro-batch's tokens
  (fᵢ: share of the top-k assignments that went to expert i; Pᵢ: its mean router probability);
- `seq_aux_loss`: the same per sequence, averaged over sequences (DeepSeek-V2/V3);
- `z_loss`: the router z-loss, mean logsumexp(logits)² (ST-MoE);
- `bias_rate`: the auxiliary-loss-free bias of DeepSeek-V3. A per-expert bias (a persistent
  buffer, so it is checkpointed) is added to the scores for choosing experts only, never to the
  gates; after every optimizer step it moves by `rate · sign(mean load − load)` using the loads
  of the whole step on every data-parallel rank (`update_balancing_bias`).
The auxiliary losses train through `AttachAux`: the block's output carries them into backward
(weighted by 1 / micro-batches of the step), so they need no route to the loss function and
work on every pipeline stage; they are not part of the reported loss.

The capacity limit applies while training; evaluation and generation route dropless (as
inference engines and the Hugging Face classes do), so a model scores the same everywhere.

Routing statistics for the metrics (expert load max / mean, router entropy, dropped share) are
accumulated in non-persistent buffers while training and read once per step (`routing_stats`).
Activation checkpointing recomputes a block and adds its counts twice; every statistic is a
ratio of counts, so that changes nothing.

The block is single-device PyTorch, like every Kiln model part: expert parallelism
(`kiln.parallel.experts`) shards `experts` and replaces `dispatch` from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels import grouped
from kiln.kernels import registry as kernels
from kiln.model.layers import SwiGLU
from kiln.syncs import note_host_read

Dispatch = Callable[[torch.Tensor, torch.Tensor, "MoEFeedForward"], torch.Tensor]


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
    """Layer `index` has an MoE feed-forward block: after the first `moe.first_dense` layers, every
    `moe.every`-th one (counting from the first MoE layer)."""
    m = cfg.moe
    return m.experts > 0 and index >= m.first_dense and (index - m.first_dense) % m.every == 0


class AttachAux(torch.autograd.Function):
    """Identity on `out` whose backward also sends gradient `weight` into `aux` (a scalar), so
    a loss term computed inside the model trains without being returned."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


def grouped_matmul_available(x: torch.Tensor) -> bool:
    """PyTorch's grouped matrix product for this device and dtype (CPU: any; CUDA: bf16 on
    Hopper or newer); elsewhere the experts run in a loop."""
    if getattr(F, "grouped_mm", None) is None and not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the grouped product's
    CPU backward rejects stride-0 (expanded) gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and torch.compiler.is_compiling():  # PyTorch's shape function wants bf16 CUDA
        return grouped.grouped_mm(x, w, offsets)
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return _ContiguousGrad.apply(fn(x, w, offs=offsets))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product takes under the active autocast (grouped_mm is not an autocast op)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def run_experts(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over rows `x` (n, d) sorted by expert, `counts[e]` rows for expert e;
    weights (E, d, h), (E, d, h), (E, h, d). Grouped products where available, else a loop."""
    dtype = _compute_dtype(x)
    xs, w1c, w3c, w2c = (t.to(dtype) for t in (x, w1, w3, w2))
    if x.shape[0] and grouped_matmul_available(xs):
        offsets = counts.cumsum(0).to(torch.int32)
        h = kernels.swiglu(_grouped(xs, w1c, offsets), _grouped(xs, w3c, offsets))
        return _grouped(h, w2c, offsets)
    outs, start = [], 0
    note_host_read()  # the loop reads the counts on the host (fp32 on CUDA, GPUs before Hopper)
    for e, n in enumerate(counts.tolist()):
        rows = xs[start : start + n]
        outs.append(kernels.swiglu(rows @ w1c[e], rows @ w3c[e]) @ w2c[e])
        start += n
    return torch.cat(outs) if outs else xs.new_zeros((0, w2.shape[-1]))


class GroupedExperts(nn.Module):
    """The routed experts' weights, stacked: w1 / w3 (E, d, h), w2 (E, h, d). Its own module so
    that expert parallelism can shard and FSDP-wrap it apart from the rest of the block; under
    expert parallelism its weights are DTensors holding this rank's experts."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # down
        self.grad_scale = 1.0  # expert parallelism sets 1 / ep (kiln.parallel.experts says why)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows `x` sorted by (local) expert, `counts[e]` rows for expert e."""
        # under expert parallelism the weights are DTensors: this rank's experts are their local part
        local = [w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w3, self.w2)]
        if self.grad_scale != 1.0:
            local = [_ScaleGrad.apply(w, self.grad_scale) for w in local]
        return run_experts(x, counts, *local)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def local_dispatch(x: torch.Tensor, counts: torch.Tensor, moe: MoEFeedForward) -> torch.Tensor:
    """Every expert on this device (no expert parallelism)."""
    return moe.experts(x, counts)


class MoEFeedForward(nn.Module):
    expert_bias: torch.Tensor  # buffers (register_buffer below)
    load: torch.Tensor
    tallies: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        d, E, h = cfg.d_model, m.experts, cfg.expert_hidden
        self.n_experts, self.top_k = E, m.top_k
        self.score = m.score
        self.norm_topk = m.norm_topk
        self.capacity_factor = m.capacity_factor
        self.aux_coef, self.seq_aux_coef, self.z_coef = m.aux_loss, m.seq_aux_loss, m.z_loss
        self.bias_rate = m.bias_rate
        self.router = nn.Linear(d, E, bias=False)
        self.experts = GroupedExperts(E, d, h)
        self.shared = SwiGLU(cfg, hidden=h * m.shared_experts) if m.shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)  # aux-loss-free balancing
        # routing statistics of the current step (training only): assignments per expert (so tokens
        # = their sum / k), dropped assignments and summed router entropy
        self.register_buffer("load", torch.zeros(E), persistent=False)
        self.register_buffer("tallies", torch.zeros(2), persistent=False)
        self.aux_weight = 1.0  # 1 / micro-batches per step (set by the train module)
        self.dispatch: Dispatch = local_dispatch  # expert parallelism swaps this from outside

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.expert_bias.zero_()
        self.load.zero_()
        self.tallies.zero_()

    # ---------------------------------------------------------------- routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N, E) fp32, scores (N, E), chosen experts (N, k), gates (N, k))."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choose = scores + self.expert_bias if self.bias_rate > 0 else scores
        chosen = choose.topk(self.top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(-1, chosen)
        if self.norm_topk and self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True).clamp(min=1e-20)
        return logits, scores, chosen, gates

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        logits, scores, chosen, gates = self.route(flat)
        N, k, E = flat.shape[0], self.top_k, self.n_experts
        expert_of = chosen.reshape(-1)  # (N k) assignments, token-major
        order = expert_of.argsort(stable=True)  # by expert, tokens in order within an expert
        # assignments per expert before capacity: a scatter, not bincount (which reads its size on the host)
        counts = demand = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(
            0, expert_of, torch.ones_like(expert_of)
        )
        weight = gates.reshape(-1)[order]
        keep = None
        if self.capacity_factor > 0 and self.training:  # the first `capacity` tokens of each expert stay (GShard)
            starts = counts.cumsum(0) - counts
            position = torch.empty_like(expert_of)
            position[order] = torch.arange(N * k, device=x.device) - starts[expert_of[order]]
            keep = position < self.capacity(N)
            if self.dispatch is local_dispatch:
                # Dropped assignments stay in place with a zero gate: the shapes do not depend on the
                # data (no host sync), and the experts compute no more rows than a dropless router.
                weight = weight * keep[order]
            else:
                return self._fixed_exchange(x, flat, logits, scores, gates, expert_of, position, keep, demand)
        token_of = order // k  # the token of each assignment, sorted by expert
        y = self.dispatch(flat[token_of], counts, self)  # (rows, d)
        weight = weight.to(y.dtype)[:, None]
        out = torch.zeros_like(flat, dtype=y.dtype).index_add_(0, token_of, y * weight)
        return self._finish(out, x, flat, logits, scores, demand, expert_of, keep)

    def _fixed_exchange(
        self,
        x: torch.Tensor,
        flat: torch.Tensor,
        logits: torch.Tensor,
        scores: torch.Tensor,
        gates: torch.Tensor,
        expert_of: torch.Tensor,
        position: torch.Tensor,
        keep: torch.Tensor,
        demand: torch.Tensor,
    ) -> torch.Tensor:
        """Expert parallelism with a capacity: every expert gets exactly `capacity` slots (GShard's
        dispatch buffer; empty slots are zeros), so the exchange has fixed sizes and needs no count
        from the device. Each assignment's slot is expert x capacity + its place in the expert's queue."""
        N, k, E = flat.shape[0], self.top_k, self.n_experts
        C = self.capacity(N)
        slot = torch.where(keep, expert_of * C + position, E * C)  # dropped ones: a spare row, cut off
        token = torch.arange(N * k, device=x.device) // k
        buffer = flat.new_zeros(E * C + 1, flat.shape[1]).index_copy(0, slot, flat[token])[: E * C]
        y = self.dispatch.fixed(buffer, C, self)  # type: ignore[attr-defined]  # (E * C, d)
        weight = (gates.reshape(-1) * keep).to(y.dtype)[:, None]
        picked = y[slot.clamp(max=E * C - 1)]
        out = torch.zeros_like(flat, dtype=y.dtype).index_add_(0, token, picked * weight)
        return self._finish(out, x, flat, logits, scores, demand, expert_of, keep)

    def _finish(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        flat: torch.Tensor,
        logits: torch.Tensor,
        scores: torch.Tensor,
        demand: torch.Tensor,
        expert_of: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        """Shared experts, routing statistics and the auxiliary losses around the routed output."""
        B, T, d = x.shape
        out = out.to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training and torch.is_grad_enabled():  # not the pipeline's shape-inference pass
            probs = scores / scores.sum(-1, keepdim=True)  # sigmoid scores made a distribution
            self._tally(probs, demand, keep)
            aux = self._aux_loss(logits, probs, demand, expert_of, B, T)
            if aux is not None:
                out = AttachAux.apply(out, aux, self.aux_weight)
        return out.view(B, T, d)

    # ---------------------------------------------------------------- balancing and statistics
    def _aux_loss(
        self, logits: torch.Tensor, probs: torch.Tensor, demand: torch.Tensor, expert_of: torch.Tensor, B: int, T: int
    ) -> torch.Tensor | None:
        terms = []
        E, k = self.n_experts, self.top_k
        if self.aux_coef:
            f = demand.float() / expert_of.numel()
            terms.append(self.aux_coef * E * (f * probs.mean(0)).sum())
        if self.seq_aux_coef:
            seq = torch.zeros(B, E, device=probs.device).scatter_add_(
                1, expert_of.view(B, T * k), torch.ones(B, T * k, device=probs.device)
            ) / (T * k)
            terms.append(self.seq_aux_coef * E * (seq * probs.view(B, T, E).mean(1)).sum(-1).mean())
        if self.z_coef:
            terms.append(self.z_coef * logits.logsumexp(-1).pow(2).mean())
        return cast(torch.Tensor, sum(terms)) if terms else None  # a sum of tensors (never the start value 0)

    @torch.no_grad()
    def _tally(self, probs: torch.Tensor, demand: torch.Tensor, keep: torch.Tensor | None) -> None:
        entropy = -(probs * probs.clamp(min=1e-20).log()).sum(-1).sum()
        self.load += demand.float()
        dropped = (~keep).sum().float() if keep is not None else entropy.new_zeros(())
        self.tallies += torch.stack([dropped, entropy])


def moe_layers(parts: list[nn.Module]) -> list[tuple[str, MoEFeedForward]]:
    return [(name, m) for part in parts for name, m in part.named_modules() if isinstance(m, MoEFeedForward)]


def set_micro_batches(parts: list[nn.Module], n: int) -> None:
    """The auxiliary losses of one step are averaged over its `n` micro-batches."""
    for _, m in moe_layers(parts):
        m.aux_weight = 1.0 / n


@torch.no_grad()
def finish_step(
    parts: list[nn.Module],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    discard: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """After an optimizer step: this step's routing counts of every MoE layer, summed over the
    data-parallel ranks by `reduce` (one collective for all layers), then
    - DeepSeek-V3's auxiliary-loss-free update: each expert's bias moves by `moe.bias_rate`
      towards the mean load (a step the guard discarded moves nothing);
    - the routing statistics per layer, as device tensors (no host sync): expert load max / mean,
      mean router entropy (nats), share of assignments dropped by the capacity limit.
    The counts are cleared for the next step."""
    layers = moe_layers(parts)
    if not layers:
        return {}
    counts = torch.stack([torch.cat([m.load, m.tallies]) for _, m in layers])  # (layers, E + 2)
    if reduce is not None:
        counts = reduce(counts)
    out: dict[str, torch.Tensor] = {}
    for (name, m), row in zip(layers, counts):
        load, (dropped, entropy) = row[:-2], row[-2:]
        if m.bias_rate > 0:
            move = torch.sign(load.mean() - load) * m.bias_rate
            if discard is not None:
                move = move * (1 - discard.to(move.dtype))
            m.expert_bias += move
        tokens = (load.sum() / m.top_k).clamp(min=1)
        label = name.removesuffix(".mlp")
        out[f"moe/{label}/load_max_mean"] = load.max() / load.mean().clamp(min=1e-20)
        out[f"moe/{label}/entropy"] = entropy / tokens
        out[f"moe/{label}/dropped"] = dropped / (tokens * m.top_k)
        m.load.zero_()
        m.tallies.zero_()
    return out
