"""`Batch.to` (kiln.objectives): to a GPU through pinned memory without blocking the host;
on the CPU unchanged. The CUDA branch is checked without a GPU by recording what it asks of torch."""

from __future__ import annotations

import torch

from kiln.objectives import Batch


def batch() -> Batch:
    windows = torch.arange(30).reshape(3, 10)
    return Batch(windows[:, :-1], windows[:, 1:], {"documents": torch.zeros(3, 9, dtype=torch.int32)})


def test_to_the_cpu_is_unchanged():
    b = batch()
    moved = b.to(torch.device("cpu"))
    assert (
        moved.inputs is b.inputs and moved.targets is b.targets and moved.extras["documents"] is b.extras["documents"]
    )


def test_to_cuda_stages_each_tensor_in_pinned_memory_and_copies_without_blocking(monkeypatch):
    pinned, copies = [], []
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kw):
        pinned.append(pin_memory)
        return real_empty(*shape, **kw)  # no CUDA here: an ordinary buffer stands in

    def to(self, device, non_blocking=False):
        copies.append((torch.device(device).type, non_blocking, self.is_contiguous()))
        return self

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "to", to)
    b = batch()
    moved = b.to(torch.device("cuda", 0))
    assert pinned == [True, True, True]  # inputs, targets, the extra
    assert copies == [("cuda", True, True)] * 3  # contiguous staging buffers, non-blocking copies
    assert torch.equal(moved.inputs, b.inputs) and torch.equal(moved.targets, b.targets)
