"""The grouped matrix product of mixture-of-experts layers as an operator `torch.compile` traces.

PyTorch's `grouped_mm` has a meta (shape) function that accepts only the CUDA kernel's inputs
(bf16), so compiling a CPU model whose experts use it fails before a graph exists. Under
`torch.compile` on CPU the experts call `kiln::grouped_mm` instead: an opaque operator with its
own shape function and backward (each backward product is a grouped product too), running
PyTorch's kernel inside. Eager runs call PyTorch's function directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _raw(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offsets)


@torch.library.custom_op("kiln::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows `x` (n, k) in groups ending at `offsets` (E,), group e times `w[e]` (k, m): (n, m)."""
    return _raw(x, w, offsets)


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[-1]))


@torch.library.custom_op("kiln::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per group e: x[group].T @ grad[group], stacked (E, k, m)."""
    return _raw(x.t(), grad, offsets)


@grouped_mm_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty((offsets.shape[0], x.shape[1], grad.shape[1]))


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # the CPU kernel rejects expanded (stride-0) gradients
    grad_x = grouped_mm(grad, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup)
