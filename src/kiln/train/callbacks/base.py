"""The `Callback` base class and the list that dispatches its events.

A callback is an aspect of training — logging, evaluation, checkpoint policy, monitoring,
profiling — that the loop only calls. Events, in the order one step sees them:

    on_run_start(trainer)                       once, after resume, before the first step
    on_step_start(trainer, step, data_index)    every step; `step` counts completed steps (0-based)
    on_loss(trainer, step, loss) -> loss        every micro-batch's scaled loss, before backward
                                                (pipeline: on the last stage); may return a new one
    on_after_backward(trainer, step)            gradients complete (before clipping and the
                                                optimizer step)
    on_step_end(trainer, result)                every step; cheap, no host sync: `result` holds
                                                device tensors, except at a logging step, where
                                                the loop has synced and they are numbers
    on_log(trainer, record)                     every `log.every` steps, with the metrics record
    on_step_complete(trainer)                   every step, once it is logged: work between steps
                                                (evaluation, checkpoints) belongs here
    on_eval(trainer, record)                    after an evaluation
    on_checkpoint(trainer, step, path)          after a checkpoint is committed (async ones too)
    on_guard_event(trainer, event)              the guard saw something and acted (skip,
                                                rollback, stop), or rolled back
    on_run_end(trainer, summary)                after the last step; add figures to `summary`
    on_error(trainer, error)                    the run is failing with `error` (then re-raised)

A callback adds numbers to the step's metrics record with `trainer.record_metric(name, value,
reduce)` (reduced over ranks and over the logging interval), keeps state across checkpoints
with `state_dict` / `load_state_dict` (JSON-serialisable; rank 0's is saved), and says with
`syncs_at(trainer, step)` that it will synchronise (evaluate, save) after `step`, so the guard
reports what it saw first. Callbacks run in `order`: producers of figures first (lower), then
user callbacks (50), then writers (90 and up).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch

# `trainer` below is the running kiln.train.trainer.Trainer and `result` its StepResult; they are
# not imported here because the trainer imports this module.
Trainer = Any
StepResult = Any


class Callback:
    name: ClassVar[str] = ""  # the registry name (`[callbacks] enabled = [name]`)
    Options: ClassVar[type | None] = None  # a dataclass of options, read from `[callbacks.<name>]`
    order: ClassVar[int] = 50

    def __init__(self, options: Any = None):
        self.options = options

    # ---------------------------------------------------------------- events
    def on_run_start(self, trainer: Trainer) -> None:
        pass

    def on_step_start(self, trainer: Trainer, step: int, data_index: int) -> None:
        pass

    def on_loss(self, trainer: Trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_after_backward(self, trainer: Trainer, step: int) -> None:
        pass

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_step_complete(self, trainer: Trainer) -> None:
        pass

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        pass

    def on_guard_event(self, trainer: Trainer, event: dict[str, Any]) -> None:
        pass

    def on_run_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        pass

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        pass

    # ---------------------------------------------------------------- state and scheduling
    def syncs_at(self, trainer: Trainer, step: int) -> bool:
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


class CallbackList:
    """Callbacks in dispatch order; each event method calls every callback's."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.items: list[Callback] = []
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: Callback) -> None:
        self.items.append(callback)
        self.items.sort(key=lambda c: c.order)  # stable: equal orders keep their insertion order

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def find(self, kind: type) -> Any:
        return next((c for c in self.items if isinstance(c, kind)), None)

    def on_run_start(self, trainer) -> None:
        for cb in self.items:
            cb.on_run_start(trainer)

    def on_step_start(self, trainer, step: int, data_index: int) -> None:
        for cb in self.items:
            cb.on_step_start(trainer, step, data_index)

    def on_loss(self, trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.items:
            loss = cb.on_loss(trainer, step, loss)
        return loss

    def on_after_backward(self, trainer, step: int) -> None:
        for cb in self.items:
            cb.on_after_backward(trainer, step)

    def on_step_end(self, trainer, result) -> None:
        for cb in self.items:
            cb.on_step_end(trainer, result)

    def on_log(self, trainer, record: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_log(trainer, record)

    def on_step_complete(self, trainer) -> None:
        for cb in self.items:
            cb.on_step_complete(trainer)

    def on_eval(self, trainer, record: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_eval(trainer, record)

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        for cb in self.items:
            cb.on_checkpoint(trainer, step, path)

    def on_guard_event(self, trainer, event: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_guard_event(trainer, event)

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_run_end(trainer, summary)

    def on_error(self, trainer, error: BaseException) -> None:
        for cb in self.items:
            try:
                cb.on_error(trainer, error)
            except Exception:  # the original error is what the user must see
                pass

    def syncs_at(self, trainer, step: int) -> bool:
        return any(cb.syncs_at(trainer, step) for cb in self.items)

    def state_dict(self) -> dict[str, Any]:
        return {cb.key: state for cb in self.items if (state := cb.state_dict())}

    def load_state_dict(self, states: dict[str, Any] | None) -> None:
        for cb in self.items:
            key = cb.key if states and cb.key in states else type(cb).__name__  # checkpoints before core names
            if states and key in states:
                cb.load_state_dict(states[key])
