"""Hang watchdog: a step that takes far longer than the running median (a deadlock, a blocked
collective, a stuck filesystem) dumps this process's Python stacks into the run folder and
exits non-zero, so the launcher (torchrun --max-restarts, a scheduler) can restart the job
from its last checkpoint. Every rank runs its own watchdog, so every rank leaves its stacks.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from kiln.config import GuardConfig

HANG_EXIT_CODE = 75


class Watchdog:
    def __init__(self, cfg: GuardConfig, run_dir: Path, rank: int):
        self.cfg = cfg
        self.path = Path(run_dir) / f"hang-rank{rank}.txt"
        self.durations: list[float] = []
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, cfg: GuardConfig, run_dir: Path, rank: int) -> "Watchdog":
        dog = cls(cfg, run_dir, rank)
        if cfg.hang_min_s > 0:
            dog._thread = threading.Thread(target=dog._watch, name="kiln-watchdog", daemon=True)
            dog._thread.start()
        return dog

    def beat(self) -> None:
        """Called at the start of every step."""
        now = time.monotonic()
        self.durations.append(now - self.last)
        del self.durations[:-100]
        self.last = now

    def limit(self) -> float:
        if len(self.durations) < 3:  # compilation and warm-up: only the absolute floor applies
            return max(self.cfg.hang_min_s, 10 * self.cfg.hang_min_s)
        return max(self.cfg.hang_min_s, self.cfg.hang_factor * statistics.median(self.durations[1:]))

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.cfg.hang_min_s / 4)):
            waited = time.monotonic() - self.last
            if waited > self.limit():
                self._dump_and_exit(waited)

    def _dump_and_exit(self, waited: float) -> None:
        try:
            with open(self.path, "w") as f:
                f.write(f"step running for {waited:.0f}s (limit {self.limit():.0f}s); Python stacks of every thread:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        finally:
            print(f"kiln: error: a training step has been running for {waited:.0f}s, far past the usual step time; "
                  f"stacks written to {self.path}; exiting so the launcher can restart from the last checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(HANG_EXIT_CODE)

    def stop(self) -> None:
        self._stop.set()
