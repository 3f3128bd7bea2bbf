"""Chunked linear + cross-entropy (kiln.kernels.cross_entropy): the naive head's loss, z-loss and
gradients to 1e-5 in float32, and a fraction of its peak memory at a 128k vocabulary."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kiln.kernels.cross_entropy import chunked_linear_cross_entropy

IGNORE = -100


def naive(h, w, t):
    logits = h @ w.T
    ce = F.cross_entropy(logits.flatten(0, -2), t.flatten(), ignore_index=IGNORE, reduction="sum")
    z = (torch.logsumexp(logits, -1).square() * (t != IGNORE)).sum()
    return ce, z


@pytest.mark.parametrize("chunk", [1, 5, 16, 1024])
@pytest.mark.parametrize("ce_coef, z_coef", [(1.0, 0.0), (0.3, 1e-3), (0.0, 1.0)])
def test_chunked_loss_and_gradients_equal_the_naive_head(chunk, ce_coef, z_coef):
    gen = torch.Generator().manual_seed(chunk)
    h = torch.randn(3, 13, 32, generator=gen).requires_grad_()
    w = (0.3 * torch.randn(301, 32, generator=gen)).requires_grad_()
    t = torch.randint(0, 301, (3, 13), generator=gen)
    t[0, :4] = IGNORE  # positions without a target
    t[2, 7] = IGNORE
    results = []
    for fn in (naive, lambda *a: chunked_linear_cross_entropy(*a, chunk=chunk)):
        ce, z = fn(h, w, t)
        (ce_coef * ce + z_coef * z).backward()
        results.append((ce.detach(), z.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_no_targets_gives_zero_loss_and_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    ce, z = chunked_linear_cross_entropy(h, w, torch.full((4,), IGNORE), chunk=2)
    (ce + z).backward()
    assert ce.item() == 0 and z.item() == 0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


PEAK = textwrap.dedent("""
    import resource, sys, torch, torch.nn.functional as F
    from kiln.kernels.cross_entropy import chunked_linear_cross_entropy
    torch.set_num_threads(2)
    N, d, V = 2048, 64, 131072
    h = torch.randn(N, d, requires_grad=True)
    w = (0.02 * torch.randn(V, d)).requires_grad_()
    t = torch.randint(0, V, (N,))
    # the gradients of the inputs exist in either head: allocate them before measuring
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[1] == "naive":
        F.cross_entropy(h @ w.T, t, reduction="sum").backward()
    else:
        sum(chunked_linear_cross_entropy(h, w, t, chunk=128)).backward()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


def test_peak_memory_of_the_loss_head_is_a_tenth_of_the_naive_at_a_128k_vocabulary():
    peaks = {}
    for mode in ("naive", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True, check=True)
        peaks[mode] = int(out.stdout.strip())  # KiB above the inputs and their gradients
    assert peaks["naive"] > 1_000_000  # >= 1 GiB: the float32 logits alone are 1 GiB
    assert peaks["chunked"] <= 0.10 * peaks["naive"], peaks


class _MatmulDtypes(TorchDispatchMode):
    """The operand dtypes of every matrix product dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append(args[-2].dtype if func.overloadpacket is torch.ops.aten.addmm else args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_the_products_run_in_bf16_and_match_the_naive_autocast_head():
    """The logits' products in bf16 (as autocast's naive head), the rest in float32: loss, z-loss and
    gradients agree with the naive bf16-autocast head to a few bf16 roundings. bf16 keeps 8
    significant bits, a relative error up to 2^-8 ~ 4e-3 per rounding; a product or a sum rounded
    once or twice, over terms of either sign, is compared relative to the largest entry."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 32, generator=gen).requires_grad_()
    w = (0.3 * torch.randn(203, 32, generator=gen)).requires_grad_()
    t = torch.randint(0, 203, (2, 9), generator=gen)
    t[0, :3] = IGNORE
    results, dtypes = [], []
    for fn in (naive, lambda *a: chunked_linear_cross_entropy(*a, chunk=4)):
        with _MatmulDtypes() as seen:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ce, z = fn(h, w, t)
            (0.5 * ce + 1e-2 * z).backward()
        dtypes.append(seen.seen)
        results.append((ce.detach().float(), z.detach().float(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    assert results[1][0].dtype == torch.float32 and results[1][2].dtype == h.dtype
    assert dtypes[1] and set(dtypes[1]) == {torch.bfloat16}, dtypes[1]  # forward and backward
    eps = 2.0**-8
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=4 * eps, atol=4 * eps * ref.abs().max().item())
    # and against float32 no closer than bf16 allows: the products did not run in float32
    ce32, _ = chunked_linear_cross_entropy(h, w, t, chunk=4)
    assert 0 < (results[1][0] - ce32).abs() < 4 * eps * ce32.abs()


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_no_op_that_waits_for_the_device():
    """Which rows carry a target stays on the device: nothing sized by the data (nonzero,
    masked_select, boolean indexing) and no scalar read back (item) in forward or backward."""
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    t = torch.tensor([1, IGNORE, 3, IGNORE, 9, 0])
    with _Ops() as ops:
        ce, z = chunked_linear_cross_entropy(h, w, t, chunk=4)
        (ce + z).backward()
    assert "mm" in ops.names
    assert not ops.names & {"nonzero", "masked_select", "_local_scalar_dense", "index", "index_put_", "index_put"}
