"""Linear + cross-entropy in chunks: the loss of `hidden @ weight.T` against targets without ever
holding the full (tokens x vocabulary) logits.

The naive head materialises float32 logits for every token (at a 128k vocabulary and 8k tokens,
4 GiB, plus as much again for their gradient). Here all rows are processed `chunk` at a time:
forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits, turns them into
their gradient in place (softmax - one-hot, plus the z-loss term) and multiplies it into the
gradients of the hidden states and the output matrix. Peak memory is one chunk's logits; the
price is one more (chunk x d x V) product per chunk in backward. Rows whose target is IGNORE go
through the same arithmetic with their target read as 0 and are masked out (a 0/1 multiply on the
loss terms, on their hidden states in grad_w's product and on their rows of grad_h), so the
number of rows with a target is never needed on the host: no device-to-host sync.

Precision: the matrix products run in the autocast dtype when autocast is on for the device at
forward time (bf16 on a GPU; backward uses the same, stored on ctx), else in float32 (on CUDA, TF32
if `train.tf32`). Everything after the product is float32: the logits come out of it as float32
(cuBLAS's float32 output of a bf16 product, elsewhere the bf16 product upcast), and the
log-sum-exp, target logit, loss, softmax gradient and grad_w's accumulation over chunks are
float32. With `fused` (the registry's Triton backend) the per-row work — log-sum-exp and target
logit in forward, the in-place gradient in backward — is one Triton kernel each
(kiln.kernels.triton_ops, on float32 logits) instead of several PyTorch passes.

Returns the summed cross-entropy and the summed z-loss term log(Z)^2 (PaLM) over the targets,
the same quantities as `Objective.loss_sum` and `z_loss_sum` on the full logits.
"""

from __future__ import annotations

import contextlib

import torch

IGNORE = -100


def _matmul_dtype(device_type: str) -> torch.dtype:
    """The autocast precision active on this device type, else float32."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _mm(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """a @ b with both operands in dt and a float32 result. cuBLAS returns the float32 accumulator
    of a bf16/fp16 product directly (`out_dtype`, the aten mm.dtype overload: CUDA only, not ROCm);
    elsewhere the product is rounded to dt and upcast."""
    a, b = a.to(dt), b.to(dt)
    if dt == torch.float32:
        return a @ b
    if a.device.type == "cuda" and torch.version.hip is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> None:
    """acc (float32, V x d) += a @ b (a: V x chunk), the product in dt. In float32 in place, as
    before. In bf16/fp16 the product is float32 where cuBLAS gives it (above), else rounded to dt
    once per chunk, and added into the float32 accumulator (the sum over chunks stays float32);
    addmm's out_dtype overload wants its input in the operands' dtype, so the product is a
    transient, taken in blocks of rows no larger than the chunk's logits (a whole V x d float32
    product would be 2 GiB at a 128k vocabulary and d = 4096)."""
    if dt == torch.float32:
        acc.addmm_(a.float(), b.float())
        return
    a, b = a.to(dt), b.to(dt)
    rows = max(1, a.shape[0] * a.shape[1] // max(1, acc.shape[1]))
    for r in range(0, acc.shape[0], rows):
        if a.device.type == "cuda" and torch.version.hip is None:
            acc[r : r + rows].add_(torch.mm(a[r : r + rows], b, out_dtype=torch.float32))
        else:
            acc[r : r + rows].add_(a[r : r + rows] @ b)  # add_ upcasts elementwise: no float32 copy


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, fused: bool):
        device_type = hidden.device.type
        dt = _matmul_dtype(device_type)  # read before autocast is turned off below
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        picked = torch.empty_like(lse)
        with _no_autocast(device_type):
            w = weight.to(dt)
            for i in range(0, n, chunk):
                t = _safe(targets[i : i + chunk])
                logits = _mm(hidden[i : i + chunk], w.T, dt)  # (chunk, V) float32
                if fused:
                    lse[i : i + chunk], picked[i : i + chunk] = _triton().ce_rows(logits, t)
                else:
                    lse[i : i + chunk] = torch.logsumexp(logits, dim=-1)
                    picked[i : i + chunk] = logits.gather(1, t[:, None]).squeeze(1)
                del logits
            valid = targets != IGNORE  # where, not a 0/1 multiply: a non-finite ignored row adds nothing
            ce = torch.where(valid, lse - picked, 0.0).sum()
            z = torch.where(valid, lse.square(), 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.fused, ctx.dtype = chunk, fused, dt
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, dt = ctx.chunk, ctx.dtype
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        with _no_autocast(hidden.device.type):
            w = weight.to(dt)
            for i in range(0, hidden.shape[0], chunk):
                hc = hidden[i : i + chunk].to(dt)
                t = _safe(targets[i : i + chunk])
                g = _mm(hc, w.T, dt)  # the chunk's logits again (float32), then their gradient in place:
                if ctx.fused:
                    _triton().ce_grad_(g, lse[i : i + chunk], t, grad_ce, grad_z)
                else:
                    chunk_lse = lse[i : i + chunk, None]
                    g.sub_(chunk_lse).exp_()  # softmax
                    # d/dlogits of ce: softmax - onehot; of z = lse^2: 2 lse softmax
                    g.mul_(grad_ce + grad_z * 2 * chunk_lse)
                    g.scatter_add_(1, t[:, None], (-grad_ce).expand(hc.shape[0], 1).to(g.dtype))
                g = g.to(dt)  # once, for both products (in bf16: the float32 gradient is freed)
                # Rows without a target contribute nothing: rather than zeroing their (chunk x V)
                # gradient, zero their (chunk x d) hidden states in grad_w's product and their rows
                # of grad_h.
                valid = (targets[i : i + chunk] != IGNORE)[:, None]
                grad_h[i : i + chunk] = _mm(g, w, dt) * valid
                if grad_w is not None:
                    _addmm_(grad_w, g.T, hc * valid, dt)
                del g
        grad_hidden = grad_h.to(hidden.dtype)
        return grad_hidden, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None


def _safe(targets: torch.Tensor) -> torch.Tensor:
    """The targets with IGNORE replaced by 0, a valid index for gather/scatter; those rows are
    masked out of the loss and the gradients. Without a host sync (no nonzero / boolean indexing)."""
    return torch.where(targets == IGNORE, 0, targets)


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
