"""The hang watchdog (kiln.train.hang_timer) as a callback: it times each step from its start to
its end, so evaluation and checkpoint time never enter the step statistics."""

from __future__ import annotations

from typing import Any

from kiln.train.callbacks.base import Callback
from kiln.train.hang_timer import Watchdog
from kiln.train.step_api import RunView


class HangWatchdog(Callback):
    name = "hang_watchdog"

    def on_run_start(self, trainer: RunView) -> None:
        self.dog = Watchdog.start(trainer.cfg.guard, trainer.run.path, trainer.par.info.rank)

    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        self.dog.step_started()

    def on_step_end(self, trainer: RunView, result) -> None:
        self.dog.step_ended()

    def on_guard_event(self, trainer: RunView, event: dict[str, Any]) -> None:
        self.dog.step_ended()  # a rollback restores a checkpoint between steps

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        self.dog.stop()

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        if hasattr(self, "dog"):
            self.dog.stop()
