"""A plugin callback for the distributed tests: counts FSDP's collectives in each step (gradient
reduce-scatters and all-reduces, parameter all-gathers by dtype) into metrics.jsonl."""

from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.distributed as dist

from kiln.train.callbacks import Callback, register_callback

# torch 2.13's FSDP2 calls the *_single names, earlier versions the *_tensor ones
WRAPPED = {
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
}


@register_callback("collectives")
class CountCollectives(Callback):
    order = 1

    def on_run_start(self, trainer):
        self.counts: Counter[str] = Counter()
        self.depth = 0  # one public collective may call another: count the outermost
        for name, kind in WRAPPED.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), kind))

    def _wrap(self, original, kind):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if not self.depth:
                tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
                if tensor is None:
                    tensor = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
                dtype = str(tensor.dtype).removeprefix("torch.")
                self.counts[kind] += 1
                self.counts[f"{kind}_{dtype}"] += 1
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted

    def on_step_end(self, trainer, result):
        for kind, n in self.counts.items():
            trainer.record_metric(f"collectives/{kind}", float(n), "max")
        self.counts.clear()
