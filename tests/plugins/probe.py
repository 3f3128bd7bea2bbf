"""A plugin callback for the distributed tests: records through the recorder what every rank
knows (its rank, its dropout seed) and writes the events it sees, per rank, to KILN_PROBE_DIR."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kiln.train.callbacks import Callback, register_callback


@register_callback("probe")
class Probe(Callback):
    order = 99

    def _write(self, trainer, *event):
        folder = Path(os.environ["KILN_PROBE_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{trainer.run.name}-rank{trainer.par.info.rank}.jsonl", "a") as f:
            f.write(json.dumps(list(event)) + "\n")

    def on_run_start(self, trainer):
        seed = float(torch.initial_seed() % 2**50)  # the dropout seed of this rank (exact in float64)
        trainer.record_metric("probe/seed_min", seed, "min")
        trainer.record_metric("probe/seed_max", seed, "max")

    def on_step_start(self, trainer, step, data_index):
        rank = float(trainer.par.info.rank)
        for reduce in ("mean", "max", "min", "sum"):
            trainer.record_metric(f"probe/rank_{reduce}", rank, reduce)
        if trainer.par.info.rank == 1:
            trainer.record_metric("probe/only_rank1", 7.0, "max")
        self._write(trainer, "step_start", step)

    def on_loss(self, trainer, step, loss):
        self._write(trainer, "loss", step)
        return loss

    def on_after_backward(self, trainer, step):
        self._write(trainer, "after_backward", step)

    def on_step_end(self, trainer, result):
        self._write(trainer, "step_end", result.step)

    def on_checkpoint(self, trainer, step, path):
        self._write(trainer, "checkpoint", step, (path / "manifest.json").is_file())
