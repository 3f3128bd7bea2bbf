"""Hang watchdog: a step that takes far longer than the running median (a deadlock, a blocked
collective, a stuck filesystem) dumps this process's Python stacks into the run folder and
exits non-zero, so the launcher (torchrun --max-restarts, a scheduler) can restart the job
from its last checkpoint. Every rank runs its own watchdog, so every rank leaves its stacks.

Limits: a step is a hang after `hang_factor` x the median step time, and never before
`hang_min_s`. Before three steps have been timed (compilation, warm-up), and between steps
(evaluation, checkpoint writes), only the floor applies, stretched by `SLACK`: those phases are
legitimately slow but can hang too. Only real step durations enter the median.
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
SLACK = 10.0  # warm-up and between-step work may take this many times hang_min_s


class Watchdog:
    def __init__(self, cfg: GuardConfig, run_dir: Path, rank: int):
        self.cfg = cfg
        self.path = Path(run_dir) / f"hang-rank{rank}.txt"
        self.durations: list[float] = []
        self.mark = time.monotonic()
        self.in_step = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, cfg: GuardConfig, run_dir: Path, rank: int) -> Watchdog:
        dog = cls(cfg, run_dir, rank)
        if cfg.hang_min_s > 0:
            dog._thread = threading.Thread(target=dog._watch, name="kiln-watchdog", daemon=True)
            dog._thread.start()
        return dog

    def step_started(self) -> None:
        self.mark, self.in_step = time.monotonic(), True

    def step_ended(self) -> None:
        now = time.monotonic()
        if self.in_step:
            self.durations.append(now - self.mark)
            del self.durations[:-100]
        self.mark, self.in_step = now, False

    def limit(self) -> float:
        if not self.in_step or len(self.durations) < 3:
            return SLACK * self.cfg.hang_min_s
        return max(self.cfg.hang_min_s, self.cfg.hang_factor * statistics.median(self.durations[1:]))

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.cfg.hang_min_s / 4)):
            waited = time.monotonic() - self.mark
            if waited > self.limit():
                self._dump_and_exit(waited)

    def _dump_and_exit(self, waited: float) -> None:
        what = "a training step" if self.in_step else "work between training steps"
        try:
            with open(self.path, "w") as f:
                f.write(
                    f"{what} running for {waited:.0f}s (limit {self.limit():.0f}s); Python stacks of every thread:\n"
                )
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        finally:
            print(
                f"kiln: error: {what} has been running for {waited:.0f}s, far past the usual step time; "
                f"stacks written to {self.path}; exiting so the launcher can restart from the last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            os._exit(HANG_EXIT_CODE)

    def stop(self) -> None:
        self._stop.set()
