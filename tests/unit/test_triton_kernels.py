"""The kernel registry and its Triton kernels: forward and backward equal the PyTorch references
in float32, on the CPU by Triton's interpreter (TRITON_INTERPRET=1, set by conftest before Triton
is imported) or on a GPU; bf16 on a GPU when there is one. Skipped where Triton is not installed
(it is an optional extra)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.kernels import reference
from kiln.kernels import registry as kernels
from kiln.kernels.cross_entropy import chunked_linear_cross_entropy
from kiln.model.registry import build_model, initialise

pytest.importorskip("triton")
TOL = dict(rtol=1e-5, atol=1e-5)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def ops():
    """kiln.kernels.triton_ops, its kernels interpreted on the CPU where there is no GPU."""
    if DEVICE == "cpu" and not kernels.interpreting():
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1")
    return importlib.import_module("kiln.kernels.triton_ops")


def both(fn_ours, fn_ref, *inputs, dtype=torch.float32, device=DEVICE):
    """Outputs and input gradients of both functions under the same upstream gradient."""
    results = []
    gen = torch.Generator().manual_seed(0)
    for fn in (fn_ours, fn_ref):
        xs = [x.detach().to(device, dtype).requires_grad_() for x in inputs]
        y = fn(*xs)
        y.backward(torch.randn(y.shape, generator=gen).to(device, dtype))
        gen.manual_seed(0)
        results.append([y.detach()] + [x.grad for x in xs])
    return results


@pytest.mark.parametrize("shape", [(2, 5, 48), (7, 33), (1, 1, 130)])
def test_rms_norm_equals_reference(ops, shape):
    x, w = torch.randn(shape), 1 + 0.1 * torch.randn(shape[-1])
    ours, ref = both(lambda a, b: ops.rms_norm(a, b, 1e-5), lambda a, b: reference.rms_norm(a, b, 1e-5), x, w)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_rms_norm_of_a_strided_view(ops):
    """q and k are normalised as (B, nh, T, hs) views of a (B, T, nh*hs) projection."""
    q = torch.randn(2, 6, 4, 16).transpose(1, 2)
    ours, ref = both(
        lambda a, b: ops.rms_norm(a.transpose(1, 2), b, 1e-6),
        lambda a, b: reference.rms_norm(a.transpose(1, 2), b, 1e-6),
        q.transpose(1, 2),
        torch.randn(16),
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("B, H, T, hs", [(2, 3, 7, 16), (1, 2, 5, 10), (1, 2, 300, 16)])  # 300: two tiles, one partial
def test_rope_equals_reference(ops, B, H, T, hs):
    cos, sin = (t.to(DEVICE).contiguous() for t in torch.randn(2, T + 3, hs // 2).unbind(0))
    x = torch.randn(B, T, H, hs).transpose(1, 2)  # the layout attention hands it: not contiguous
    ours, ref = both(lambda a: ops.rope(a, cos, sin), lambda a: reference.rope(a, cos, sin), x)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_swiglu_equals_reference(ops):
    gate, up = torch.randn(3, 7, 1500), torch.randn(3, 7, 1500)  # more than one block
    ours, ref = both(ops.swiglu, reference.swiglu, gate, up)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("V", [301, 2500])  # one vocabulary block, and several with a ragged tail
def test_fused_cross_entropy_equals_naive_head(ops, V):
    gen = torch.Generator().manual_seed(V)
    h = torch.randn(2, 11, 24, generator=gen)
    w = 0.3 * torch.randn(V, 24, generator=gen)
    t = torch.randint(0, V, (2, 11), generator=gen)
    t[0, :3] = -100
    t = t.to(DEVICE)
    results = []
    for fused in (True, None):
        hh, ww = h.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_()
        if fused:
            ce, z = chunked_linear_cross_entropy(hh, ww, t, chunk=5, fused=True)
        else:
            logits = hh @ ww.T
            ce = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")
            z = (torch.logsumexp(logits, -1).square() * (t != -100)).sum()
        (0.7 * ce + 1e-2 * z).backward()
        results.append((ce.detach(), z.detach(), hh.grad, ww.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def test_a_target_outside_the_vocabulary_makes_the_loss_nan(ops):
    """It read the logit at row * stride + target: another row's, or past the buffer."""
    V = 301
    logits = torch.randn(4, V).to(DEVICE)
    targets = torch.tensor([0, V, -1, V - 1]).to(DEVICE)
    lse, picked = ops.ce_rows(logits, targets)
    assert torch.isnan(picked[1]) and torch.isnan(picked[2])
    assert picked[0] == logits[0, 0] and picked[3] == logits[3, V - 1]


def test_registry_dispatch(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.use_backend("torch"):
        assert not kernels.runs_triton(x)
    with kernels.use_backend("triton"):
        assert kernels.runs_triton(x)  # interpreted on the CPU
    with kernels.use_backend("auto"):
        assert not kernels.runs_triton(x)  # auto: Triton only on CUDA
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="runs on CUDA devices, not on cpu"):
        kernels.check_backend("triton", torch.device("cpu"))
    kernels.check_backend("auto", torch.device("cpu"))
    with pytest.raises(ConfigError, match="choose one of auto, torch, triton"):
        kernels.set_backend("cutlass")


@pytest.mark.parametrize("qk_norm", [False, True])
def test_decoder_through_triton_equals_torch(ops, qk_norm):
    """A whole llama-style decoder (RMSNorm, RoPE, SwiGLU; q/k norms) and the fused loss head: the
    loss and every parameter's gradient as with the references."""
    cfg = ModelConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        seq_len=12,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        qk_norm=qk_norm,
    )
    model = build_model(cfg, 97)
    initialise(model, cfg, seed=3).to(DEVICE)
    tokens = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = []
    for backend in ("triton", "torch"):
        model.zero_grad()
        with kernels.use_backend(backend):
            ce, z = model(tokens[:, :-1], head=lambda h, w: kernels.linear_cross_entropy(h, w, tokens[:, 1:], 7))
        (ce + 1e-3 * z).backward()
        grads.append([ce.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on a GPU")
def test_kernels_in_bf16_on_a_gpu():
    ops = importlib.import_module("kiln.kernels.triton_ops")
    x, w = torch.randn(64, 512), torch.randn(512)
    cos, sin = (t.cuda().contiguous() for t in torch.randn(2, 64, 32).unbind(0))
    q = torch.randn(2, 64, 4, 64).transpose(1, 2)
    bf = dict(rtol=2e-2, atol=2e-2)
    for fns, inputs in (
        ((lambda a, b: ops.rms_norm(a, b, 1e-5), lambda a, b: reference.rms_norm(a, b, 1e-5)), (x, w)),
        ((lambda a: ops.rope(a, cos, sin), lambda a: reference.rope(a, cos, sin)), (q,)),
        ((ops.swiglu, reference.swiglu), (x, x.flip(0))),
    ):
        ours, ref = both(*fns, *inputs, dtype=torch.bfloat16, device="cuda")
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.float(), b.float(), **bf)
