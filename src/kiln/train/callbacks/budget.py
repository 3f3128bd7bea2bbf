"""`train.time_budget_s`: fit the run to a wall-clock budget on whatever machine runs it.

The budget is seconds of steps: evaluation and checkpoint time are not counted, the first steps
of a process (allocator, kernel caches) are. After `WARMUP_STEPS` untimed steps and
`CALIBRATION_STEPS` timed ones the run makes a first estimate of its length, then keeps measuring
and re-estimates every `REESTIMATE_EVERY` steps: the steps done plus the budget left divided by
the seconds per step over the recent half of the run. So a slow moment at the start (a busy
neighbour, a cold cache) costs the seconds it took and no more; it does not decide the length.

The length is committed late: once `COMMIT_FRACTION` of the budget is spent, or earlier when the
schedule would start to depend on it (a WSD decay about to begin) or the run is about to end. The
decision is written to config.toml (train.steps = N, train.time_budget_s = 0) and to events.jsonl
before any later checkpoint, so a resumed run trains exactly those steps; a checkpoint before the
commit saves the seconds spent, so a run resumed from it keeps the budget it had left.

Schedules: with `wsd` and `constant` the learning rate before the commit does not depend on the
length (the stable phase; the committed length never moves the decay before a step already
trained), so the losses equal those of a run given `train.steps = N` from the start. With `cosine`
the learning rate follows the current estimate until the commit.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import torch

from kiln.config import ScheduleConfig
from kiln.train.callbacks.base import Callback
from kiln.train.optim import wsd_decay_start
from kiln.train.step_api import RunView

WARMUP_STEPS = 3  # untimed: the first steps of a process run slower than the rest
CALIBRATION_STEPS = 8  # timed before the first estimate
REESTIMATE_EVERY = 10  # steps between estimates (each one a broadcast from rank 0 when distributed)
COMMIT_FRACTION = 0.6  # of the budget spent when the length is committed at the latest
MAX_SAMPLES = 2048  # clock samples kept for the rate (thinned by half beyond this: bounded memory)

clock = time.perf_counter  # a module attribute so a test can drive the budget with its own clock


def length_floor(done: int, ceiling: int, cfg: ScheduleConfig) -> int:
    """The shortest length that keeps the steps already trained on the schedule they had: at least
    one more step and the LR warmup plus two; under WSD, a decay that starts after them."""
    floor = max(done + 1, min(cfg.warmup_steps + 2, ceiling))
    if cfg.name == "wsd":
        while floor < ceiling and wsd_decay_start(floor, cfg) < done:
            floor += 1
    return min(floor, ceiling) if ceiling > done else done


def estimate_steps(done: int, spent_s: float, per_step: float, budget_s: float, ceiling: int) -> int:
    """The run's length if the remaining budget goes at `per_step` seconds a step."""
    left = max(budget_s - spent_s, 0.0)
    return max(done, min(ceiling, done + int(left / max(per_step, 1e-9))))


class TimeBudget(Callback):
    name = "time_budget"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.prior_s = 0.0  # seconds of steps spent before this process (a resumed run)
        self.t0: float | None = None
        self.committed: dict[str, Any] | None = None
        self.first_estimate: int | None = None
        self.trained = 0  # steps this process trained (rollbacks included: each one took time)
        self.samples: list[tuple[int, float]] = []  # (steps trained, seconds spent), thinned
        self.last_spent = 0.0

    # ---------------------------------------------------------------- clock
    def spent(self, trainer: RunView) -> float:
        """Seconds of steps spent so far, this run's earlier processes included."""
        assert self.t0 is not None
        return self.prior_s + (clock() - self.t0) - (trainer.pause_seconds - self.p0)

    def rate(self) -> float:
        """Seconds per step over the recent half of the timed steps (at least CALIBRATION_STEPS)."""
        n, now = self.samples[-1]
        back = min(n - CALIBRATION_STEPS, WARMUP_STEPS + (n - WARMUP_STEPS) // 2)
        i = max(bisect.bisect_right(self.samples, (back, float("inf"))) - 1, 0)
        n0, then = self.samples[i]
        return (now - then) / max(n - n0, 1)

    def _sample(self, trainer: RunView) -> None:
        self.last_spent = self.spent(trainer)
        self.samples.append((self.trained, self.last_spent))
        if len(self.samples) > MAX_SAMPLES:  # every other one, the newest kept
            self.samples = self.samples[-2::-2][::-1] + self.samples[-1:]

    # ---------------------------------------------------------------- events
    def on_run_start(self, trainer: RunView) -> None:
        self.trained, self.samples = 0, []
        self.t0, self.p0 = clock(), trainer.pause_seconds
        self.last_spent = self.prior_s

    def on_step_end(self, trainer: RunView, result) -> None:
        if self.committed is not None or self.t0 is None:
            return
        self.trained += 1
        if self.trained < WARMUP_STEPS:
            return
        due = self.trained - WARMUP_STEPS - CALIBRATION_STEPS
        if due >= 0 and due % REESTIMATE_EVERY == 0 and isinstance(result.loss, torch.Tensor):
            float(result.loss)  # wait for the device, so the time is the steps' and not their dispatch
        self._sample(trainer)
        if due < 0 or due % REESTIMATE_EVERY:
            return
        # rank 0's clock decides for every rank, so all of them train the same number of steps
        spent, per_step = trainer.par.broadcast((self.last_spent, self.rate()))
        self.reestimate(trainer, spent, per_step)

    def reestimate(self, trainer: RunView, spent: float, per_step: float) -> None:
        cfg = trainer.cfg
        budget, ceiling, done = cfg.train.time_budget_s, cfg.total_steps, trainer.step
        steps = estimate_steps(done, spent, per_step, budget, ceiling)
        if self.first_estimate is None:
            self.first_estimate = steps
            trainer.say(
                f"  time budget {budget:.0f}s at {per_step:.3f}s/step: about {steps} of the {ceiling} steps "
                f"(re-measured every {REESTIMATE_EVERY} steps; fixed once {COMMIT_FRACTION:.0%} of the budget is spent)"
            )
        near_end = steps <= done + REESTIMATE_EVERY
        decay_soon = cfg.schedule.name == "wsd" and wsd_decay_start(steps, cfg.schedule) <= done + REESTIMATE_EVERY
        if spent >= COMMIT_FRACTION * budget or near_end or decay_soon:
            self.commit(trainer, max(steps, length_floor(done, ceiling, cfg.schedule)), spent, per_step)
        else:
            trainer.set_total_steps(max(steps, done + 1))  # provisional: the loop and a cosine schedule follow it

    def commit(self, trainer: RunView, steps: int, spent: float, per_step: float) -> None:
        cfg = trainer.cfg
        budget, ceiling = cfg.train.time_budget_s, cfg.total_steps
        event = {
            "step": trainer.step,
            "kind": "time_budget",
            "budget_s": budget,
            "spent_s": round(spent, 3),
            "seconds_per_step": per_step,
            "steps": steps,
            "first_estimate": self.first_estimate,
            "ceiling": ceiling,
        }
        trainer.set_total_steps(steps, final=True)  # kept in checkpoints and recorded in config.toml
        trainer.log_event(event)
        fits = "all" if steps == ceiling else f"{steps} of the {ceiling}"
        trainer.say(
            f"  time budget {budget:.0f}s: {spent:.0f}s spent at step {trainer.step}, now {per_step:.3f}s/step: "
            f"training {fits} steps; recorded in config.toml"
        )
        self.committed = event

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        if self.committed is not None:  # committed during a step, so the clock was started
            summary["time_budget"] = {**self.committed, "used_s": round(self.spent(trainer), 3)}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.committed is not None or self.t0 is None:
            return {}
        return {"spent_s": self.last_spent}  # a checkpoint follows a step: the seconds spent by its end

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        # at a resume (before on_run_start): the seconds spent before the checkpoint; at a rollback
        # during the run the clock keeps running, since the rolled-back steps took time too
        if state and self.t0 is None:
            self.prior_s = float(state.get("spent_s", 0.0))
