"""The loop's checkpoint policy: when to save (every `checkpoint.every` steps and at the end),
what a failed write does (`checkpoint.on_error`: stop with a message, or continue without it),
and when a checkpoint counts as committed — for an asynchronous save, when every rank has
finished writing it, found at a logging step or at the next save. Each committed save is
recorded in events.jsonl: {"kind": "checkpoint", "step", "bytes", "seconds", "hash_seconds",
"blocking_seconds"} (see kiln.train.checkpoint.SaveStats), and `committed(step, path)` is called
(the loop passes the callbacks' `on_checkpoint`). A part of the loop, not a callback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kiln.errors import KilnError
from kiln.train.checkpoint import checkpoint_step, step_dir_name
from kiln.train.step_api import LoopView


class CheckpointPolicy:
    name = "checkpoints"  # `callbacks.disabled = ["checkpoints"]` leaves it out

    def __init__(self, committed: Callable[[int, Path], None] | None = None):
        self.last_saved = -1
        self.committed = committed  # told of each committed checkpoint: (step, path)

    def due(self, trainer: LoopView, step: int) -> bool:
        every = trainer.cfg.checkpoint.every
        return step >= trainer.total_steps or (bool(every) and step % every == 0)

    def after_step(self, trainer: LoopView) -> None:
        """Between steps: note an asynchronous save that finished; save if one is due."""
        if trainer.checkpointer.pending and trainer.log_due:
            self._committed(trainer, self._guarded(trainer, trainer.checkpointer.poll))
        if self.due(trainer, trainer.step):
            self.save(trainer)

    def finish(self, trainer: LoopView) -> None:
        """At the run's end: its last step saved and every save committed."""
        # rank 0's view decides for all (a save is collective; other nodes may not share the folder)
        exists = trainer.par.broadcast((trainer.run.checkpoints / step_dir_name(trainer.step)).is_dir())
        if self.last_saved != trainer.step and not exists:  # e.g. the loop never ran in this process
            self.save(trainer)
        self.flush(trainer)

    def on_error(self, trainer: LoopView, error: BaseException) -> None:
        if trainer.checkpointer.pending and isinstance(error, KilnError):
            try:  # a user-facing stop (guard, budget): keep the checkpoint that is being written
                self.flush(trainer)
            except BaseException:
                pass

    def save(self, trainer: LoopView) -> Path | None:
        """Checkpoint now. A failed write (disk full, ...) leaves every earlier checkpoint intact."""
        self.last_saved = trainer.step
        with trainer.paused("checkpoint"):
            module = trainer.module
            path = self._guarded(
                trainer,
                lambda: trainer.checkpointer.save(trainer.step, module.parts, module.optimizers, trainer.state()),
            )
            self._committed(trainer, path)
            if trainer.done:
                self.flush(trainer)
        return path

    def flush(self, trainer: LoopView) -> None:
        """Commit an asynchronous save in flight (waiting for it)."""
        if trainer.checkpointer.pending:
            with trainer.paused("checkpoint"):
                self._committed(trainer, self._guarded(trainer, trainer.checkpointer.wait))

    def _committed(self, trainer: LoopView, path: Path | None) -> None:
        if path is None:
            return
        stats = getattr(trainer.checkpointer, "last_save", None)  # a stand-in checkpointer may keep none
        if trainer.is_main and stats is not None and stats.step == checkpoint_step(path):
            trainer.run.log_event(stats.event())  # what it cost: bytes, seconds, hashing, the loop held
        if self.committed is not None:
            self.committed(checkpoint_step(path), path)

    def _guarded(self, trainer: LoopView, write: Callable[[], Path | None]) -> Path | None:
        try:
            return write()
        except OSError as e:
            folder = trainer.run.checkpoints
            message = (
                f"writing checkpoint step {trainer.step} to {folder} failed ({e.strerror or e}); "
                "earlier checkpoints are intact"
            )
            action = trainer.cfg.checkpoint.on_error
            if trainer.is_main:
                trainer.run.log_event(
                    {"step": trainer.step, "kind": "checkpoint_failed", "error": str(e), "action": action}
                )
            if action == "stop":
                raise KilnError(message + "; free space and resume with --resume") from None
            trainer.say(f"  warning: {message}; continuing (checkpoint.on_error = continue)")
            return None
