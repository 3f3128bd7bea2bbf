"""`memory`: where the memory goes. On a GPU, a CUDA memory snapshot (the pickle PyTorch's
memory visualiser reads, https://pytorch.org/memory_viz) of the allocations up to a step; on
CPU, a resident-memory timeline (`memory.jsonl` and `memory.png`). The largest resident set of
any rank also goes into the metrics records as `rss_gb`."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import ConfigError
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView

FILE = "memory.jsonl"


@dataclass
class MemoryOptions:
    every: int = 1  # CPU: sample the resident set every N steps
    snapshot_step: int = 0  # GPU: dump the snapshot after this step (0 = at the end of the run)
    max_entries: int = 100000  # GPU: allocation events kept

    def check(self) -> None:
        if self.every < 1 or self.snapshot_step < 0 or self.max_entries < 1:
            raise ConfigError("callbacks.memory needs every >= 1, snapshot_step >= 0 and max_entries >= 1")


def resident_gb() -> float:
    """This process's current resident set size."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MemoryMonitor(Callback):
    name = "memory"
    Options = MemoryOptions

    def __init__(self, options: MemoryOptions | None = None):
        super().__init__(options or MemoryOptions())
        self.recording = False

    def on_run_start(self, trainer: RunView) -> None:
        self.cuda = trainer.device.type == "cuda"
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=self.options.max_entries)
            self.recording = True

    def on_step_end(self, trainer: RunView, result) -> None:
        if self.cuda:
            if self.recording and self.options.snapshot_step and trainer.step >= self.options.snapshot_step:
                self._snapshot(trainer)
            return
        if trainer.step % self.options.every == 0 or trainer.log_due:
            rss = resident_gb()
            trainer.record_metric("rss_gb", rss, reduce="max")
            if trainer.is_main:
                trainer.run.append(FILE, {"step": trainer.step, "rss_gb": rss})

    def _snapshot(self, trainer: RunView) -> None:
        path = trainer.run.path / f"memory_snapshot-rank{trainer.par.info.rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        trainer.say(f"  memory: CUDA snapshot after step {trainer.step} -> {path} (open at pytorch.org/memory_viz)")

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        if self.recording:
            self._snapshot(trainer)
        if not self.cuda and trainer.is_main:
            plot_rss(trainer.run)

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False


def plot_rss(run) -> None:
    records = run.read_jsonl(run.path / FILE)
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in records], [r["rss_gb"] for r in records], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("resident memory (GiB), rank 0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.path / "memory.png", dpi=100)
    plt.close(fig)
