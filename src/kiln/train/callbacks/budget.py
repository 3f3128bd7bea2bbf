"""`train.time_budget_s`: fit the run to a wall-clock budget on whatever machine runs it.

After `WARMUP_STEPS` steps (allocator, kernel caches and the like make them slow) the next
`CALIBRATION_STEPS` steps are timed, without evaluation
or checkpoint time; the run then trains `floor(budget / seconds per step)` steps (never more than
train.steps / train.tokens allow, never fewer than the LR warmup plus two). The decision is
written to config.toml (train.steps = N, train.time_budget_s = 0) and to events.jsonl before any
later checkpoint, so a resumed run trains exactly the steps the uninterrupted one would have.
The learning-rate schedule follows the new length from then on; the steps before the decision
lie inside the warmup when train.schedule.warmup_steps > the calibration, so they are unaffected.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kiln.train.callbacks.base import Callback

WARMUP_STEPS = 3  # untimed: the first steps of a process run slower than the rest
CALIBRATION_STEPS = 8


class TimeBudget(Callback):
    order = 5

    def on_run_start(self, trainer) -> None:
        self.first = trainer.step
        self.t0: float | None = None

    def on_step_start(self, trainer, step: int, data_index: int) -> None:
        if step == self.first + WARMUP_STEPS and self.t0 is None:
            self.t0, self.p0 = time.perf_counter(), trainer.pause_seconds

    def on_step_end(self, trainer, result) -> None:
        if (
            self.t0 is None
            or trainer.step != self.first + WARMUP_STEPS + CALIBRATION_STEPS
            or not trainer.cfg.train.time_budget_s
        ):
            return
        if isinstance(result.loss, torch.Tensor):
            float(result.loss)  # wait for the device, so the time is the steps' and not their dispatch
        per_step = (time.perf_counter() - self.t0 - (trainer.pause_seconds - self.p0)) / CALIBRATION_STEPS
        self.decide(trainer, trainer.par.broadcast(per_step))  # rank 0's clock decides for every rank

    def decide(self, trainer, per_step: float) -> None:
        cfg = trainer.cfg
        budget, ceiling = cfg.train.time_budget_s, cfg.total_steps
        floor = max(trainer.step + 1, min(cfg.schedule.warmup_steps + 2, ceiling))
        steps = max(floor, min(ceiling, int(budget / max(per_step, 1e-9))))
        trainer.total_steps = steps
        cfg.train.steps, cfg.train.tokens, cfg.train.time_budget_s = steps, 0, 0.0
        event = {
            "step": trainer.step,
            "kind": "time_budget",
            "budget_s": budget,
            "seconds_per_step": per_step,
            "steps": steps,
            "ceiling": ceiling,
        }
        if trainer.is_main:
            trainer.run.write_config(cfg)
            trainer.run.log_event(event)
        fits = "all" if steps == ceiling else f"{steps} of the {ceiling}"
        trainer.say(
            f"  time budget {budget:.0f}s at {per_step:.3f}s/step: training {fits} steps "
            f"(~{steps * per_step / 60:.1f} min of steps); recorded in config.toml"
        )
        self.budget_event: dict[str, Any] = event

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        if getattr(self, "budget_event", None):
            summary["time_budget"] = self.budget_event
