"""`profiler`: a `torch.profiler` trace of a range of steps, saved in the run folder as a Chrome
trace (`profile/trace-rank<r>.json`, open it in chrome://tracing or Perfetto) and a table of
the top operators (`profile/top_ops-rank<r>.txt`). Costs nothing outside the range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import ConfigError
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView


@dataclass
class ProfilerOptions:
    start: int = 5  # profile from this completed step (after warm-up) ...
    steps: int = 3  # ... for this many steps
    record_shapes: bool = False
    memory: bool = False  # also record allocations
    row_limit: int = 25  # operators in the table

    def check(self) -> None:
        if self.start < 0 or self.steps < 1:
            raise ConfigError("callbacks.profiler needs start >= 0 and steps >= 1")


class Profiler(Callback):
    name = "profiler"
    Options = ProfilerOptions

    def __init__(self, options: ProfilerOptions | None = None):
        super().__init__(options or ProfilerOptions())
        self.prof: torch.profiler.profile | None = None

    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        if step == self.options.start and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if trainer.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities, record_shapes=self.options.record_shapes, profile_memory=self.options.memory
            )
            self.prof.__enter__()
            self.first = step + 1

    def on_step_end(self, trainer: RunView, result) -> None:
        if self.prof is not None and trainer.step >= self.options.start + self.options.steps:
            self._finish(trainer)

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        if self.prof is not None:
            self._finish(trainer)

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None

    def _finish(self, trainer: RunView) -> None:
        prof, self.prof = self.prof, None
        assert prof is not None  # callers check that a profile is running
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        prof.__exit__(None, None, None)
        folder = trainer.run.path / "profile"
        folder.mkdir(exist_ok=True)
        rank = trainer.par.info.rank
        prof.export_chrome_trace(str(folder / f"trace-rank{rank}.json"))
        sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=self.options.row_limit)
        (folder / f"top_ops-rank{rank}.txt").write_text(
            f"steps {self.first}..{trainer.step} on rank {rank}, sorted by {sort}\n{table}\n"
        )
        trainer.say(
            f"  profiler: steps {self.first}..{trainer.step} -> {folder}/trace-rank{rank}.json, top_ops-rank{rank}.txt"
        )
