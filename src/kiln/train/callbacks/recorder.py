"""Metrics that callbacks add to the step records of `metrics.jsonl`.

`record(name, value, reduce)` may be called at any step, with a number or a device tensor (no
host sync). At the next logging step `collect` combines what was recorded since the last one,
first over the interval, then over every rank, with the same operation: `mean` (of all values
recorded on all ranks), `sum`, `max` or `min`. Ranks may record different names: every rank
learns the union (one small object collective per logging interval), and a rank that recorded
nothing contributes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

REDUCES = ("mean", "sum", "max", "min")
_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf}


class MetricRecorder:
    def __init__(self, device: torch.device, distributed: bool = False):
        self.device = device
        self.distributed = distributed
        self._values: dict[str, tuple[str, list[Any]]] = {}

    def record(self, name: str, value: float | torch.Tensor, reduce: str = "mean") -> None:
        if reduce not in REDUCES:
            raise ValueError(f"record_metric({name!r}): reduce must be one of {', '.join(REDUCES)}, got {reduce!r}")
        kind, values = self._values.setdefault(name, (reduce, []))
        if kind != reduce:
            raise ValueError(f"metric {name!r} recorded with reduce={reduce!r} after reduce={kind!r}")
        values.append(value.detach().float() if isinstance(value, torch.Tensor) else float(value))

    def __bool__(self) -> bool:
        return bool(self._values)

    def _local(self) -> dict[str, tuple[str, torch.Tensor, float]]:
        """name -> (reduce, combined value (a 0-d float64 tensor on the device), count) over this rank's interval."""
        out = {}
        for name, (kind, values) in self._values.items():
            t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device) for v in values])
            if kind in ("mean", "sum"):
                out[name] = (kind, t.sum(), float(len(values)))
            else:
                out[name] = (kind, t.max() if kind == "max" else t.min(), float(len(values)))
        return out

    def collect(self) -> dict[str, float]:
        """Everything recorded since the last call, reduced; clears the recorder. Every rank must
        call it at the same steps."""
        local = self._local()
        self._values = {}
        if not self.distributed:
            return {n: (v.item() / c if k == "mean" else v.item()) for n, (k, v, c) in sorted(local.items())}
        names: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted((n, k) for n, (k, _, _) in local.items()))
        union = sorted({tuple(x) for per_rank in names for x in per_rank})
        kinds = dict(union)
        if len(kinds) != len(union):
            clash = next(n for n, _ in union if sum(1 for m, _ in union if m == n) > 1)
            raise ValueError(f"metric {clash!r} is recorded with different reduce operations on different ranks")
        ordered = [n for n, _ in union]
        sums = torch.zeros(2 * len(ordered), dtype=torch.float64, device=self.device)  # value, count
        maxes = torch.full((len(ordered),), -math.inf, dtype=torch.float64, device=self.device)
        mins = torch.full((len(ordered),), math.inf, dtype=torch.float64, device=self.device)
        for i, name in enumerate(ordered):
            if name not in local:
                continue
            kind, value, count = local[name]
            if kind in ("mean", "sum"):
                sums[2 * i] = value
                sums[2 * i + 1] = count
            elif kind == "max":
                maxes[i] = value
            else:
                mins[i] = value
        dist.all_reduce(sums)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        dist.all_reduce(mins, op=dist.ReduceOp.MIN)
        s, mx, mn = sums.tolist(), maxes.tolist(), mins.tolist()
        out = {}
        for i, name in enumerate(ordered):
            kind = kinds[name]
            if kind == "mean":
                out[name] = s[2 * i] / s[2 * i + 1] if s[2 * i + 1] else math.nan
            elif kind == "sum":
                out[name] = s[2 * i]
            else:
                out[name] = mx[i] if kind == "max" else mn[i]
        return out
