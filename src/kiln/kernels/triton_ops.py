"""Triton versions of the registered kernels (kiln.kernels.registry), forward and backward.

Each computes in float32 and returns the input's dtype, as the references do up to rounding.
Why fuse: RMSNorm's reference runs ~4 passes over the activations in forward and more in backward;
RoPE's builds two halves and concatenates them; SwiGLU's autograd keeps three tensors (gate,
silu(gate), up) where the kernel keeps two. The cross-entropy kernels read a chunk's logits once in
forward (online log-sum-exp and the target's logit) and once in backward (the gradient written in
place), where PyTorch takes four passes. Imported only when the backend runs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMENTWISE_BLOCK = 1024
VOCAB_BLOCK = 1024


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D (rows, last dim) tensor whose last dimension is contiguous."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---- RMSNorm ------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets in 64 bits: rows x width can pass 2^31
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(
    DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, N, n_rows, rows_per_program, BLOCK: tl.constexpr
):
    # Each program takes a run of rows and sums its share of dW; the shares are added in PyTorch.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x))
        dx = rstd * (g - x * (rstd * rstd) * (tl.sum(g * x, axis=0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x * rstd
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        n_rows, N = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(N)
        _rms_norm_fwd[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, N = x2.shape
        dx = torch.empty_like(x2)
        programs = max(
            1, min(n_rows, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 8)
        )
        per = triton.cdiv(n_rows, programs)
        dw_part = torch.empty(programs, N, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](
            dy2,
            x2,
            weight,
            rstd,
            dx,
            dw_part,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            N,
            n_rows,
            per,
            BLOCK=triton.next_power_of_2(N),
        )
        return dx.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


# ---- RoPE -----------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y, H, T, sxb, sxh, sxt, syb, syh, syt, HALF, sign, BLOCK: tl.constexpr, ROWS: tl.constexpr
):
    # One program per (batch, head, block of ROWS positions): a (ROWS x HALF) tile of each half, so
    # a program moves a few KiB rather than one 32-value row. sign = -1 rotates back (backward).
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(T, ROWS)
    tb = pid % blocks
    bh = pid // blocks
    h = bh % H
    b = bh // H
    t = tb * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (t[:, None] < T) & (cols[None, :] < HALF)
    xo = X + b * sxb + h * sxh + t[:, None] * sxt + cols[None, :]
    x1 = tl.load(xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xo + HALF, mask=mask, other=0.0).to(tl.float32)
    co = t[:, None] * HALF + cols[None, :]
    c = tl.load(COS + co, mask=mask, other=0.0)
    s = tl.load(SIN + co, mask=mask, other=0.0) * sign
    yo = Y + b * syb + h * syh + t[:, None] * syt + cols[None, :]
    tl.store(yo, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(yo + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


ROPE_TILE = 2048  # values of each half per program


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    y = torch.empty(B, H, T, D, dtype=x.dtype, device=x.device)
    half = D // 2
    block = triton.next_power_of_2(half)
    rows = max(1, min(triton.next_power_of_2(T), ROPE_TILE // block))
    _rope_kernel[(B * H * triton.cdiv(T, rows),)](
        x,
        cos,
        sin,
        y,
        H,
        T,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        half,
        sign,
        BLOCK=block,
        ROWS=rows,
    )
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1.0), None, None  # a rotation's transpose is the opposite rotation


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _Rope.apply(x, cos, sin)


# ---- SwiGLU ---------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (a * tl.sigmoid(a) * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=mask)
    tl.store(DA + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        a, b = gate.contiguous(), up.contiguous()
        y = torch.empty_like(a)
        n = a.numel()
        _swiglu_fwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](a, b, y, n, BLOCK=ELEMENTWISE_BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        _swiglu_bwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](dy, a, b, da, db, n, BLOCK=ELEMENTWISE_BLOCK)
        return da, db


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


# ---- cross-entropy rows (inside kiln.kernels.cross_entropy's chunk loop) ----------------------


@triton.jit
def _ce_fwd(L, TGT, LSE, PICKED, stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = L + row * stride
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):  # online log-sum-exp: one read of the row
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(LSE + row, m + tl.log(s))
    # A target outside the vocabulary would read another row's logit (or past the buffer) and give a
    # plausible, wrong loss; NaN instead makes the step non-finite, which the guard reports.
    target = tl.load(TGT + row)
    tl.store(PICKED + row, tl.load(base + target, mask=(target >= 0) & (target < V), other=float("nan")))


@triton.jit
def _ce_grad(L, TGT, LSE, G_CE, G_Z, stride, V, BLOCK: tl.constexpr):
    # logits -> d(loss)/d(logits) in place: softmax * (g_ce + 2 g_z lse) - g_ce at the target
    row = tl.program_id(0).to(tl.int64)
    base = L + row * stride
    lse = tl.load(LSE + row)
    target = tl.load(TGT + row)
    g_ce = tl.load(G_CE)
    scale = g_ce + 2.0 * tl.load(G_Z) * lse
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0)
        g = tl.exp(x - lse) * scale
        g = tl.where(cols == target, g - g_ce, g)
        tl.store(base + cols, g, mask=mask)


def ce_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp and target logit; logits (n, V) float32, row-contiguous."""
    n, V = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    picked = torch.empty_like(lse)
    if n:
        _ce_fwd[(n,)](
            logits, targets, lse, picked, logits.stride(0), V, BLOCK=min(VOCAB_BLOCK, triton.next_power_of_2(V))
        )
    return lse, picked


def ce_grad_(
    logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad_ce: torch.Tensor, grad_z: torch.Tensor
) -> torch.Tensor:
    """Overwrite the logits with the gradient of grad_ce * ce + grad_z * lse^2 with respect to them."""
    n, V = logits.shape
    if n:
        g_ce = grad_ce.detach().float().reshape(1).contiguous()
        g_z = grad_z.detach().float().reshape(1).contiguous()
        _ce_grad[(n,)](
            logits, targets, lse, g_ce, g_z, logits.stride(0), V, BLOCK=min(VOCAB_BLOCK, triton.next_power_of_2(V))
        )
    return logits
