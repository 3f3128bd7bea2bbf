"""Chunked linear + cross-entropy (kiln.kernels.cross_entropy): the naive head's loss, z-loss and
gradients to 1e-5 in float32, and a fraction of its peak memory at a 128k vocabulary."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

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
