"""The `Callback` base class, the order callbacks run in, and the list that dispatches events.

A callback is an aspect of training — logging, monitoring, profiling, faults, a user's plugin —
that the loop only calls. It sees the run through `RunView` (kiln.train.step_api): it reads there
and acts through that view's methods, never by assigning attributes of the trainer, its module,
sampler or config. Events, in the order one step sees them (kiln.train.trainer.Trainer.fit):

    on_run_start(trainer)                       once, after resume, before the first step
    on_step_start(trainer, step, data_index)    every step; `step` counts completed steps (0-based)
    on_batch(trainer, step, data_index, windows) -> windows
                                                the token windows the step trains on; may return
                                                others (faults); an observer returns them as given
    on_phase(trainer, phase)                    the step finished a phase: "data",
                                                "forward_backward", "grad_norm", "optimizer"
    on_loss(trainer, step, loss) -> loss        every micro-batch's scaled loss, before backward
                                                (pipeline: on the last stage); may return a new one
    on_after_backward(trainer, step)            gradients complete (before clipping and the
                                                optimizer step)
    before_optimizer_step(trainer, step) -> flag | None
                                                gradients clipped; a 0-d device tensor, nonzero (or
                                                True) vetoes the update, combined with the guard's
                                                flag on the device: no host sync
    on_optimizer_step(trainer, step, discard)   the update was applied, or not where `discard`
                                                (that device flag, None if nothing could veto)
    on_step_end(trainer, result)                every step; cheap, no host sync: `result` holds
                                                device tensors, except at a logging step, where
                                                the loop has synced and they are numbers
    on_log(trainer, record)                     every `log.every` steps, with the metrics record
    on_step_verify(trainer)                     every step, before its evaluation and checkpoint:
                                                checks of the state a checkpoint would keep
    on_eval(trainer, record)                    after the loop's evaluation
    on_checkpoint(trainer, step, path)          after a checkpoint is committed (async ones too)
    on_step_complete(trainer)                   every step, after its record, evaluation and
                                                checkpoint: other work between steps goes here
    on_guard_event(trainer, event)              the guard saw something and acted (skip,
                                                rollback, stop), or rolled back
    on_run_end(trainer, summary)                after the last step; add figures to `summary`
    on_error(trainer, error)                    the run is failing with `error` (then re-raised)
    around_collective(trainer, fn) -> fn()      wraps each of Kiln's own collectives (timing)

A callback adds numbers to the step's metrics record with `trainer.record_metric(name, value,
reduce)` (reduced over ranks and over the logging interval), keeps state across checkpoints
with `state_dict` / `load_state_dict` (JSON-serialisable; rank 0's is saved), and says with
`syncs_at(trainer, step)` that it will synchronise after `step`, so the guard reports what it saw
first. Callbacks run in the order of `ORDER` below; a callback not in it runs at its own `order`
(default 50: after the producers of figures, before the writers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from kiln.train.step_api import RunView, StepResult

T = TypeVar("T")

# The order built-in callbacks see every event in, lower first, in one table. The loop's own
# parts (evaluation, checkpoints) are not callbacks: Trainer.fit runs them in its written order.
ORDER: dict[str, int] = {
    "step_time": 4,  # its clock starts before every other callback's step start
    "faults": 5,  # before every other callback: they see the faulty step as it is
    "time_budget": 5,  # its clock, like step_time's, before the others' work
    "hang_watchdog": 6,
    "routing": 10,  # producers of figures for the step's record ...
    "mixture": 10,
    "invariants": 15,
    "samples": 35,
    "throughput": 40,
    "layer_stats": 50,  # ... monitors, at the place of a user's callback (50 unless it sets `order`)
    "memory": 50,
    "profiler": 50,
    "console": 90,  # writers of what was produced
    "metrics": 91,
    "plot": 92,
    "tensorboard": 95,
    "wandb": 95,
    "status": 99,  # after everything else has ended the run
}
USER_ORDER = 50


def order_of(callback: Callback) -> int:
    """Where `callback` runs: its own `order` if it sets one, else its name's place in ORDER."""
    own = type(callback).order
    return own if own is not None else ORDER.get(callback.name, USER_ORDER)


class Callback:
    name: ClassVar[str] = ""  # the registry name (`[callbacks] enabled = [name]`)
    Options: ClassVar[type | None] = None  # a dataclass of options, read from `[callbacks.<name>]`
    order: ClassVar[int | None] = None  # None: by name in ORDER (a user's callback: 50)

    def __init__(self, options: Any = None):
        self.options = options

    # ---------------------------------------------------------------- events
    def on_run_start(self, trainer: RunView) -> None:
        pass

    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        pass

    def on_batch(self, trainer: RunView, step: int, data_index: int, windows: torch.Tensor) -> torch.Tensor:
        return windows

    def on_phase(self, trainer: RunView, phase: str) -> None:
        pass

    def on_loss(self, trainer: RunView, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_after_backward(self, trainer: RunView, step: int) -> None:
        pass

    def before_optimizer_step(self, trainer: RunView, step: int) -> torch.Tensor | None:
        return None

    def on_optimizer_step(self, trainer: RunView, step: int, discard: torch.Tensor | None) -> None:
        pass

    def around_collective(self, trainer: RunView, fn: Callable[[], T]) -> T:
        return fn()

    def on_step_end(self, trainer: RunView, result: StepResult) -> None:
        pass

    def on_log(self, trainer: RunView, record: dict[str, Any]) -> None:
        pass

    def on_step_verify(self, trainer: RunView) -> None:
        pass

    def on_step_complete(self, trainer: RunView) -> None:
        pass

    def on_eval(self, trainer: RunView, record: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: RunView, step: int, path: Path) -> None:
        pass

    def on_guard_event(self, trainer: RunView, event: dict[str, Any]) -> None:
        pass

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        pass

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        pass

    # ---------------------------------------------------------------- state and scheduling
    def syncs_at(self, trainer: RunView, step: int) -> bool:
        """True if this callback synchronises (evaluates, checkpoints) after step `step`."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @property
    def key(self) -> str:
        """The name its state is saved under in checkpoints."""
        return self.name or type(self).__name__


# Events dispatched inside every step: only the callbacks that override one are called for it.
HOT_EVENTS = ("on_batch", "on_phase", "on_loss", "before_optimizer_step", "on_optimizer_step", "around_collective")


class CallbackList:
    """Callbacks in dispatch order; each event method calls every callback's."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.items: list[Callback] = []
        self.hot: dict[str, list[Callback]] = {}
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: Callback) -> None:
        self.items.append(callback)
        self.items.sort(key=order_of)  # stable: equal orders keep their insertion order
        self.hot = {
            event: [cb for cb in self.items if getattr(type(cb), event) is not getattr(Callback, event)]
            for event in HOT_EVENTS
        }

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def wants(self, event: str) -> bool:
        """Whether any callback overrides hot `event` (the loop installs nothing otherwise)."""
        return bool(self.hot[event])

    def on_run_start(self, trainer: RunView) -> None:
        for cb in self.items:
            cb.on_run_start(trainer)

    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        for cb in self.items:
            cb.on_step_start(trainer, step, data_index)

    def on_batch(self, trainer: RunView, step: int, data_index: int, windows: torch.Tensor) -> torch.Tensor:
        for cb in self.hot["on_batch"]:
            windows = cb.on_batch(trainer, step, data_index, windows)
        return windows

    def on_phase(self, trainer: RunView, phase: str) -> None:
        for cb in self.hot["on_phase"]:
            cb.on_phase(trainer, phase)

    def on_loss(self, trainer: RunView, step: int, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.hot["on_loss"]:
            loss = cb.on_loss(trainer, step, loss)
        return loss

    def on_after_backward(self, trainer: RunView, step: int) -> None:
        for cb in self.items:
            cb.on_after_backward(trainer, step)

    def before_optimizer_step(self, trainer: RunView, step: int) -> torch.Tensor | None:
        """Every callback's veto as one float flag on the device, 1 = discard (None: no veto offered)."""
        veto = None
        for cb in self.hot["before_optimizer_step"]:
            flag = cb.before_optimizer_step(trainer, step)
            if flag is not None:
                flag = flag.float()  # the guard's convention, which fused optimizers read: 1 = discard
                veto = flag if veto is None else torch.maximum(veto, flag)
        return veto

    def on_optimizer_step(self, trainer: RunView, step: int, discard: torch.Tensor | None) -> None:
        for cb in self.hot["on_optimizer_step"]:
            cb.on_optimizer_step(trainer, step, discard)

    def around_collective(self, trainer: RunView, fn: Callable[[], T]) -> T:
        call = fn
        for cb in reversed(self.hot["around_collective"]):  # the first in order is the outermost
            call = _bind(cb, trainer, call)
        return call()

    def on_step_end(self, trainer: RunView, result: StepResult) -> None:
        for cb in self.items:
            cb.on_step_end(trainer, result)

    def on_log(self, trainer: RunView, record: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_log(trainer, record)

    def on_step_verify(self, trainer: RunView) -> None:
        for cb in self.items:
            cb.on_step_verify(trainer)

    def on_step_complete(self, trainer: RunView) -> None:
        for cb in self.items:
            cb.on_step_complete(trainer)

    def on_eval(self, trainer: RunView, record: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_eval(trainer, record)

    def on_checkpoint(self, trainer: RunView, step: int, path: Path) -> None:
        for cb in self.items:
            cb.on_checkpoint(trainer, step, path)

    def on_guard_event(self, trainer: RunView, event: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_guard_event(trainer, event)

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_run_end(trainer, summary)

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        for cb in self.items:
            try:
                cb.on_error(trainer, error)
            except Exception:  # the original error is what the user must see
                pass

    def syncs_at(self, trainer: RunView, step: int) -> bool:
        return any(cb.syncs_at(trainer, step) for cb in self.items)

    def state_dict(self) -> dict[str, Any]:
        return {cb.key: state for cb in self.items if (state := cb.state_dict())}

    def load_state_dict(self, states: dict[str, Any] | None) -> None:
        for cb in self.items:
            key = cb.key if states and cb.key in states else type(cb).__name__  # checkpoints before core names
            if states and key in states:
                cb.load_state_dict(states[key])


def _bind(cb: Callback, trainer: RunView, inner: Callable[[], T]) -> Callable[[], T]:
    return lambda: cb.around_collective(trainer, inner)
