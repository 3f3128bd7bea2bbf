"""A plugin for the invariant tests (tests/distributed/test_invariants_dist.py): breaks one rank
on purpose, as KILN_PERTURB says (the `invariants` callback itself is built in).

    KILN_PERTURB=params:K   after optimizer step K, rank KILN_PERTURB_RANK (default 1) adds 1e-3
                            to every element of its local parameters (a diverged replica)
    KILN_PERTURB=data       that rank reads rank 0's data (its sampler's rank and first row are set to 0's)
    unset or empty          nothing
"""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor

from kiln.train.callbacks import Callback, register_callback


@register_callback("perturb")
class Perturb(Callback):
    def __init__(self, options=None):
        super().__init__(options)
        what, _, step = os.environ.get("KILN_PERTURB", "").partition(":")
        self.what, self.step = what, int(step or 0)
        self.rank = int(os.environ.get("KILN_PERTURB_RANK", "1"))

    def _mine(self, trainer) -> bool:
        return bool(self.what) and trainer.par.info.rank == self.rank

    def on_run_start(self, trainer):
        if self.what == "data" and self._mine(trainer):
            trainer.sampler.rank, trainer.sampler.offset = 0, 0  # rank 0's rows of every global batch

    def on_step_end(self, trainer, result):
        if self.what == "params" and result.step == self.step and self._mine(trainer):
            with torch.no_grad():
                for p in trainer.module.parameters():
                    (p.to_local() if isinstance(p, DTensor) else p).add_(1e-3)
