"""The typed interface between the training loop and its callbacks: what a callback may read of
the run and what it may do. The loop (kiln.train.trainer.Trainer) implements these protocols;
callbacks (kiln.train.callbacks) are written against them and import nothing of the loop.

A callback reads through `RunView` and acts only through its methods — it never assigns an
attribute of the trainer, its module, its sampler or its config (tests/unit/test_architecture.py
fails if one does). What changes during a run lives in the trainer's checkpointed state:

    record_metric(name, value, reduce)   a number for the next metrics record
    say(text) / log_event(event)          a console line (rank 0) / an events.jsonl record (rank 0)
    scale_lr(factor)                      multiply the peak learning rate from now on (checkpointed,
                                          and an `lr_scale` record in events.jsonl)
    set_total_steps(steps, final)         the run's length; a final one is kept in checkpoints (a
                                          resume restores it) and in the run's config.toml
    paused(what)                          work between steps, kept out of step time and throughput

What used to be patched is a hook of `Callback` (kiln.train.callbacks.base): `on_batch` (change
the batch a step trains on), `before_optimizer_step` (veto an update with a device flag, so the
step stays free of host syncs), `on_optimizer_step` (see what was vetoed), `on_phase` and
`around_collective` (time the step's phases and Kiln's own collectives).

`LoopView` adds what the loop's own parts (evaluation, checkpoints) and the core callbacks that
show the data (samples, the loss plot; `loop_view` narrows to it) need beyond that: the data, the
validation shares and the checkpointer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from kiln.config import Config
    from kiln.data.loader import BatchSampler, WindowShare
    from kiln.data.mixture import MixturePrepared
    from kiln.data.mixture_sampler import MixtureSampler
    from kiln.data.multimodal.loader import MultimodalSampler
    from kiln.data.multimodal.prepare import MultimodalPrepared
    from kiln.data.shards import Prepared
    from kiln.model.spec import ModelSpec
    from kiln.parallel.runtime import Parallel
    from kiln.runfolder.folder import RunFolder
    from kiln.train.checkpoint import Checkpointer
    from kiln.train.module import TrainModule


@dataclass
class StepResult:
    step: int  # optimizer steps completed, this one included (the numbering of metrics.jsonl)
    data_index: int  # the data batch it trained on
    loss: torch.Tensor | float  # mean loss per predicted token over the global batch
    grad_norm: torch.Tensor | float  # before clipping
    lr: float

    def on_host(self) -> StepResult:
        """The same result with numbers instead of device tensors (one host sync for both)."""
        if not isinstance(self.loss, torch.Tensor):
            return self
        assert isinstance(self.grad_norm, torch.Tensor)  # train_step gives both as device tensors
        loss, norm = torch.stack([self.loss.detach().double(), self.grad_norm.detach().double()]).tolist()
        return replace(self, loss=loss, grad_norm=norm)


class RunView(Protocol):
    """What every callback reads (read-only: properties) and the actions it may take."""

    @property
    def cfg(self) -> Config: ...  # as the run started; never changed while it runs

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def run(self) -> RunFolder: ...  # the run folder (its files are written by rank 0)

    @property
    def par(self) -> Parallel: ...  # ranks, layout, mesh, device, collectives

    @property
    def module(self) -> TrainModule: ...  # the model parts and their optimizers: read, hook, never rebind

    @property
    def sampler(self) -> BatchSampler | MixtureSampler | MultimodalSampler: ...  # read batches, never patch

    @property
    def step(self) -> int: ...  # optimizer steps completed

    @property
    def total_steps(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def is_main(self) -> bool: ...

    @property
    def precision(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tokens_per_step(self) -> int: ...

    @property
    def tokens_seen(self) -> int: ...

    @property
    def done(self) -> bool: ...

    @property
    def log_due(self) -> bool: ...  # this step writes a metrics record

    @property
    def pause_seconds(self) -> float: ...  # seconds spent between steps so far

    @property
    def skipped(self) -> list[list[int]]: ...  # data batch ranges never trained on (inclusive)

    @property
    def new_tensors(self) -> tuple[str, ...]: ...  # a fork's added parameters

    @property
    def last_record(self) -> dict[str, Any]: ...  # the newest metrics record

    def record_metric(self, name: str, value: float | torch.Tensor, reduce: str = "mean") -> None: ...

    def say(self, text: str) -> None: ...

    def log_event(self, event: dict[str, Any]) -> None: ...

    def paused(self, what: str) -> AbstractContextManager[None]: ...

    def scale_lr(self, factor: float) -> None: ...

    def set_total_steps(self, steps: int, final: bool = False) -> None: ...


@runtime_checkable
class LoopView(RunView, Protocol):
    """What the loop's own parts read besides: the data and its validation shares, the checkpointer."""

    @property
    def data(self) -> Prepared | MixturePrepared | MultimodalPrepared: ...

    @property
    def val(self) -> WindowShare: ...

    @property
    def extra_val(self) -> dict[str, WindowShare]: ...

    @property
    def source_val(self) -> dict[str, tuple[WindowShare, float]]: ...

    @property
    def eval_batch(self) -> int: ...

    @property
    def checkpointer(self) -> Checkpointer: ...

    def state(self) -> dict[str, Any]: ...


def loop_view(view: RunView) -> LoopView:
    """The loop's fuller view, for the core callbacks the loop itself builds (the console's banner,
    samples, the loss plot): a plugin handed a bare RunView gets a clear error, not a missing attribute."""
    if not isinstance(view, LoopView):
        raise TypeError(f"{type(view).__name__} is not the training loop: this callback needs its data")
    return view
