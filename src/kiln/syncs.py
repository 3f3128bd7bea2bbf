"""Counting host synchronisations inside a training step (`debug.count_syncs = true`).

On a GPU the host queues kernels ahead of the device; an operation whose result the host must
read (`.item()`, `bool(t)`, a tensor used as a Python index) or whose output shape depends on the
data (`nonzero`, boolean indexing, `bincount`, `unique`, ...) makes the host wait until the
device has caught up, and the device idles while the host queues the next work. A step should
have none. The counter sees them on any device, CPU included, so a CPU test catches what would
stall a GPU:

- a dispatch mode records each such operation as it is dispatched (with the tensors' devices, so
  on a GPU run host-side bookkeeping on CPU tensors is not counted);
- on CUDA, `torch.cuda.set_sync_debug_mode("warn")` also reports synchronising calls inside
  kernels the dispatch mode cannot see; a step counts the larger of the two figures;
- torch.compile does not compile under a Python dispatch mode (the step would run eagerly), so a
  compiled step on CUDA is counted by the sync debug mode alone; on CPU a compiled step is counted
  eagerly (the same operations; the run's `graph_breaks` then says nothing, and is left out);
- a device-to-host copy (`.tolist()`, `.cpu()`) is a sync the dispatch mode sees on a GPU; on CPU
  the tensor is already on the host and nothing is dispatched, so code that reads a tensor on the
  host on purpose (expert parallelism's dropless exchange of split sizes) calls `note_host_read()`
  and is counted on CPU too.

The trainer wraps forward, backward, gradient clipping, the guard and the optimizer step only;
evaluation, checkpoints, logging and the time-budget calibration are outside.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations that always force a host sync (their result is read by the host, or their output's
# shape depends on the data).
_ALWAYS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), a 0-d tensor as an index
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.equal.default,  # returns a Python bool
}
_BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_COPIES = {aten._to_copy.default, aten.copy_.default}

_active: list[SyncCounter] = []


def note_host_read(n: int = 1) -> None:
    """`n` deliberate host reads of device tensors (`.tolist()`): counted where the dispatch mode
    cannot see them, on CPU (on a GPU the copy to the host is seen and counted already)."""
    if _active and _active[-1].device.type == "cpu":
        _active[-1].count += n


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def forces_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether dispatching `func` with these arguments makes the host wait for the device."""
    if func in _ALWAYS:
        return True
    if func in _BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        masks = [t for t in _tensors(indices) if t is not None and t.dtype == torch.bool]
        if func is not aten.index.Tensor and len(masks) == 1 and len(indices) == 1:
            values = args[2] if len(args) > 2 else kwargs.get("values")
            if isinstance(values, torch.Tensor) and values.numel() == 1:
                return False  # `x[mask] = scalar` runs as masked_fill_: no count needed
        return bool(masks)
    if func in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if func in _COPIES:  # a device tensor copied to the host (.tolist(), .cpu())
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            return src.device.type != "cpu" and dst.device.type == "cpu"
        target = kwargs.get("device")
        return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    return False


class _SyncMode(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if forces_sync(func, args, kwargs) and self.counter.on_device(args):
            self.counter.count += 1
        return func(*args, **kwargs)


class SyncCounter:
    """Counts host syncs inside `with counter.counting():` blocks; `take()` returns and clears."""

    def __init__(self, device: torch.device, compiled: bool = False):
        self.device = device
        self.compiled = compiled
        self.count = 0

    def on_device(self, args: tuple) -> bool:
        """An operation on the training device's tensors (CPU bookkeeping on a GPU run is free)."""
        tensors = list(_tensors(args))
        return not tensors or any(t.device.type == self.device.type for t in tensors)

    @contextmanager
    def counting(self) -> Iterator[None]:
        before = self.count
        _active.append(self)
        try:
            if self.device.type == "cuda":
                with self._cuda_sync_warnings() as seen:
                    if self.compiled:  # the dispatch mode would keep the step from compiling
                        yield
                    else:
                        with _SyncMode(self):
                            yield
                # each sync the dispatch mode saw also warns: the larger figure counts them once
                self.count = before + max(self.count - before, len(seen))
            else:
                with _SyncMode(self):
                    yield
        finally:
            _active.remove(self)

    @contextmanager
    def _cuda_sync_warnings(self) -> Iterator[list]:
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            seen: list = []
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:  # the step's other warnings go on to where they were going
            if "synchronizing" in str(w.message):
                seen.append(w)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)

    def take(self) -> int:
        n, self.count = self.count, 0
        return n
