"""Linear + cross-entropy in chunks: the loss of `hidden @ weight.T` against targets without ever
holding the full (tokens x vocabulary) logits.

The naive head materialises float32 logits for every token (at a 128k vocabulary and 8k tokens,
4 GiB, plus as much again for their gradient). Here the tokens that carry a target are processed
`chunk` rows at a time: forward keeps only each row's log-sum-exp; backward recomputes a chunk's
logits, turns them into their gradient in place (softmax - one-hot, plus the z-loss term) and
multiplies it into the gradients of the hidden states and the output matrix. Peak memory is one
chunk's logits; the price is one more (chunk x d x V) product per chunk in backward. The logits
are computed in float32 whatever the autocast precision. With `fused` (the registry's Triton
backend) the per-row work — log-sum-exp and target logit in forward, the in-place gradient in
backward — is one Triton kernel each (kiln.kernels.triton_ops) instead of several PyTorch passes.

Returns the summed cross-entropy and the summed z-loss term log(Z)^2 (PaLM) over the targets,
the same quantities as `Objective.loss_sum` and `z_loss_sum` on the full logits.
"""

from __future__ import annotations

import torch

IGNORE = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, fused: bool):
        rows = (targets != IGNORE).nonzero().flatten()
        h, t = hidden[rows], targets[rows]
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        picked = torch.empty_like(lse)
        w = weight.float()
        for i in range(0, h.shape[0], chunk):
            logits = h[i : i + chunk].float() @ w.T  # (chunk, V) float32
            if fused:
                lse[i : i + chunk], picked[i : i + chunk] = _triton().ce_rows(logits, t[i : i + chunk])
            else:
                lse[i : i + chunk] = torch.logsumexp(logits, dim=-1)
                picked[i : i + chunk] = logits.gather(1, t[i : i + chunk, None]).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, targets, rows, lse)
        ctx.chunk, ctx.fused = chunk, fused
        return (lse - picked).sum(), lse.square().sum()

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor):
        hidden, weight, targets, rows, lse = ctx.saved_tensors
        chunk = ctx.chunk
        h, t = hidden[rows], targets[rows]
        w = weight.float()
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        for i in range(0, h.shape[0], chunk):
            hc = h[i : i + chunk].float()
            g = hc @ w.T  # the chunk's logits again, then their gradient in place:
            if ctx.fused:
                _triton().ce_grad_(g, lse[i : i + chunk], t[i : i + chunk], grad_ce, grad_z)
            else:
                chunk_lse = lse[i : i + chunk, None]
                g.sub_(chunk_lse).exp_()  # softmax
                # d/dlogits of ce: softmax - onehot; of z = lse^2: 2 lse softmax
                g.mul_(grad_ce + grad_z * 2 * chunk_lse)
                g.scatter_add_(1, t[i : i + chunk, None], (-grad_ce).expand(hc.shape[0], 1).to(g.dtype))
            grad_h[i : i + chunk] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.T, hc)
            del g
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32).index_copy_(0, rows, grad_h).to(hidden.dtype)
        return grad_hidden, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None


def _triton():
    from kiln.kernels import triton_ops

    return triton_ops


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, summed log(Z)^2) of logits `hidden @ weight.T` over the positions
    whose target is not IGNORE; hidden (..., d), weight (V, d), targets (...). `fused`: the row
    work in Triton (CUDA, or TRITON_INTERPRET=1)."""
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk, fused
    )
