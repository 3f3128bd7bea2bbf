"""status.json: whether the run is running (with a heartbeat and its pid), finished, failed,
stopped by the guard or interrupted, so `kiln runs` can tell a live run from a killed one
(see kiln.runfolder.status)."""

from __future__ import annotations

import time
from typing import Any

from kiln.runfolder.status import running_record
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView

HEARTBEAT_S = 5.0  # at most one status write per this many seconds of logging steps


class RunStatus(Callback):
    name = "status"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.started = time.time()
        self.earlier_s = 0.0
        self.last_beat = 0.0

    def _write(self, trainer: RunView, record: dict[str, Any]) -> None:
        if trainer.is_main:
            trainer.run.write_json("status.json", record)

    def on_run_start(self, trainer: RunView) -> None:
        self.started = time.time()
        before = trainer.run.status() if trainer.is_main else {}
        self.earlier_s = float(before.get("active_s") or 0.0)  # time earlier processes spent on this run
        self._beat(trainer)

    def _active(self) -> float:
        return round(self.earlier_s + time.time() - self.started, 1)

    def _beat(self, trainer: RunView) -> None:
        self.last_beat = time.monotonic()
        self._write(trainer, {**running_record(trainer.step, self.started), "active_s": self._active()})

    def on_log(self, trainer: RunView, record: dict[str, Any]) -> None:
        if time.monotonic() - self.last_beat >= HEARTBEAT_S:
            self._beat(trainer)

    def _ended(self, trainer: RunView, state: str, **extra: Any) -> None:
        self._write(
            trainer,
            {
                "state": state,
                "step": trainer.step,
                "started": self.started,
                "ended": time.time(),
                "active_s": self._active(),
                **extra,
            },
        )

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        self._ended(trainer, "finished")

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        from kiln.train.guard import GuardStop

        if isinstance(error, GuardStop):
            self._ended(trainer, "stopped", reason=str(error))
        elif isinstance(error, KeyboardInterrupt):
            self._ended(trainer, "interrupted", reason="interrupted (Ctrl-C or SIGINT)")
        else:
            self._ended(trainer, "failed", reason=f"{type(error).__name__}: {error}"[:500])
