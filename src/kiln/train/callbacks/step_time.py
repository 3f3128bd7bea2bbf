"""`step_time`: where a step's time goes, in every metrics record (means over the interval,
averaged over ranks):

    step_time/data_s              reading the batch and making inputs and targets
    step_time/forward_backward_s  forward and backward passes (FSDP's all-gathers and
                                  reduce-scatters overlap with them and are counted here)
    step_time/grad_norm_s         the gradient norm and clipping (its all-reduce across shards)
    step_time/optimizer_s         the optimizer step
    step_time/comm_s              the collectives Kiln issues itself (token counts, loss and
                                  gradient-norm reductions), a part of the phases above
    step_time/rank<r>_busy_s      (distributed) rank r's phases minus its time in those
                                  collectives: a slow rank stands out, the others wait

What it adds when on: on a GPU, one torch.cuda.synchronize() at each phase boundary of a timed
step (and around each of Kiln's own collectives), so phases are measured, not their kernel
launches; the steps get a little slower. On CPU the operations are synchronous and nothing is
added. Off, the loop's phase marks cost one attribute test each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.errors import ConfigError
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView

PHASES = ("data", "forward_backward", "grad_norm", "optimizer")


@dataclass
class StepTimeOptions:
    every: int = 1  # time every N-th step

    def check(self) -> None:
        if self.every < 1:
            raise ConfigError(f"callbacks.step_time.every must be >= 1, got {self.every}")


class StepTime(Callback):
    name = "step_time"
    Options = StepTimeOptions

    def __init__(self, options: StepTimeOptions | None = None):
        super().__init__(options or StepTimeOptions())
        self.timing = False

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def on_run_start(self, trainer: RunView) -> None:
        self.device, self.cuda = trainer.device, trainer.device.type == "cuda"

    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        self.timing = (step + 1) % self.options.every == 0
        if self.timing:
            self._sync()
            self.t = time.perf_counter()
            self.spent = dict.fromkeys(PHASES, 0.0)
            self.comm = 0.0

    def on_phase(self, trainer: RunView, phase: str) -> None:
        """The loop finished `phase` of the current step."""
        if self.timing:
            self._sync()
            now = time.perf_counter()
            self.spent[phase] += now - self.t
            self.t = now

    def around_collective(self, trainer: RunView, fn):
        """Run one of Kiln's collectives, timing it on timed steps."""
        if not self.timing:
            return fn()
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        if hasattr(out, "wait"):  # an async collective's result (DTensor.full_tensor): wait for it here
            out = out.wait()
        self._sync()
        self.comm += time.perf_counter() - t0
        return out

    def on_step_end(self, trainer: RunView, result) -> None:
        if not self.timing:
            return
        self.timing = False
        for phase in PHASES:
            trainer.record_metric(f"step_time/{phase}_s", self.spent[phase])
        trainer.record_metric("step_time/comm_s", self.comm)
        if trainer.par.distributed:
            # Each rank's own work (its step minus its waits in Kiln's collectives): a slow rank
            # shows here, while the others only wait for it in their collectives.
            busy = sum(self.spent.values()) - self.comm
            trainer.record_metric(f"step_time/rank{trainer.par.info.rank}_busy_s", busy, reduce="max")
