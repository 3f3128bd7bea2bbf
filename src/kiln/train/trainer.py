"""The training loop: batch -> forward/backward -> clip -> guard -> optimizer step, then the
step's record, evaluation and checkpoint, in the order `fit` and `train_step` read top to bottom;
every other behaviour (logging, throughput, samples, the watchdog, plots, monitoring, faults)
is in callbacks (kiln.train.callbacks), which see the loop through kiln.train.step_api.

`kiln.train.build.build_trainer` assembles a `Trainer` from a config; `Trainer.fit` runs it.
The trainer keeps the state that must survive a checkpoint (step, guard, callback states) and
acts on what the guard saw (skip, roll back to a checkpoint, stop).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln.config import Config
from kiln.data.loader import BatchSampler, WindowShare
from kiln.data.mixture import MixturePrepared
from kiln.data.mixture_sampler import MixtureSampler
from kiln.data.shards import Prepared
from kiln.data.skips import add_range, data_index, skipped_ranges
from kiln.model.spec import ModelSpec
from kiln.parallel.runtime import Parallel
from kiln.progress import console, quiet
from kiln.runfolder.folder import RunFolder
from kiln.syncs import SyncCounter
from kiln.train.callbacks.base import CallbackList
from kiln.train.callbacks.recorder import MetricRecorder
from kiln.train.checkpoint import Checkpointer, UnusableCheckpoint, checkpoint_step, newest_checkpoint
from kiln.train.checkpoint_policy import CheckpointPolicy
from kiln.train.evaluation import Evaluation
from kiln.train.guard import Guard, GuardStop
from kiln.train.module import TrainModule
from kiln.train.optim import lr_at
from kiln.train.seeding import dropout_seed
from kiln.train.step_api import StepResult

if TYPE_CHECKING:
    from kiln.data.multimodal.loader import MultimodalSampler
    from kiln.data.multimodal.prepare import MultimodalPrepared


def graph_breaks() -> int | None:
    """Graph breaks torch.compile met in this process so far (each one splits a compiled step);
    None when nothing was compiled (no train.compile, or the step ran eagerly)."""
    from torch._dynamo.utils import counters

    if not counters["stats"]["unique_graphs"]:
        return None
    return sum(counters["graph_break"].values())


@dataclass
class Trainer:
    cfg: Config
    spec: ModelSpec
    run: RunFolder
    data: Prepared | MixturePrepared | MultimodalPrepared
    par: Parallel
    module: TrainModule
    sampler: BatchSampler | MixtureSampler | MultimodalSampler
    val: WindowShare  # this data-parallel rank's share of the validation windows
    eval_batch: int  # windows per evaluation forward
    callbacks: CallbackList
    checkpointer: Checkpointer
    guard: Guard | None = None
    evaluation: Evaluation | None = None  # None: callbacks.disabled names it
    checkpoints: CheckpointPolicy | None = None
    step: int = 0  # optimizer steps completed
    total_steps: int = 0
    pause_seconds: float = 0.0  # time spent evaluating and checkpointing (not step time)
    last_record: dict[str, Any] = field(default_factory=dict)
    recorder: MetricRecorder = field(init=False)  # what callbacks record for the next metrics record
    lr_multiplier: float = 1.0  # what callbacks' scale_lr made of optim.lr (checkpointed)
    skipped: list[list[int]] = field(default_factory=list)  # data batch ranges never trained on (inclusive)
    new_tensors: tuple[str, ...] = ()  # a fork's added parameters, absent from its parent's checkpoint
    extra_val: dict[str, WindowShare] = field(default_factory=dict)  # more validation sets: name -> share
    # a mixture's sources: name -> (validation share, weight); val_loss is their weighted mean
    source_val: dict[str, tuple[WindowShare, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.total_steps = self.total_steps or self.cfg.total_steps
        self.recorder = MetricRecorder(self.par.device, self.par.distributed)
        self.started = time.perf_counter()
        self.pauses: dict[str, float] = {}  # seconds between steps, by what they were spent on
        self._pause_depth = 0
        compiled = self.cfg.train.compile or self.cfg.parallel.compile_blocks
        self.syncs = SyncCounter(self.par.device, compiled) if self.cfg.debug.count_syncs else None
        self._breaks_before = graph_breaks() or 0  # the process's count: this run reports its own
        self.length_decided: int | None = None  # set_total_steps(final=True): checkpointed
        if self.checkpoints is not None:
            self.checkpoints.committed = lambda step, path: self.callbacks.on_checkpoint(self, step, path)

    # ------------------------------------------------------------------ views for callbacks
    @property
    def device(self) -> torch.device:
        return self.par.device

    @property
    def is_main(self) -> bool:
        return self.par.is_main

    @property
    def precision(self) -> str:
        return self.module.precision

    @property
    def vocab_size(self) -> int:
        return self.data.vocab_size

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch * self.cfg.model.seq_len

    @property
    def tokens_seen(self) -> int:
        return self.step * self.tokens_per_step

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def log_due(self) -> bool:
        return self.step % self.cfg.log.every == 0 or self.done

    def record_metric(self, name: str, value: float | torch.Tensor, reduce: str = "mean") -> None:
        """Add a number to the metrics record of the next logging step (see MetricRecorder)."""
        self.recorder.record(name, value, reduce)

    def say(self, text: str) -> None:
        if not quiet() and self.par.is_main:
            console.print(text)

    def log_event(self, event: dict[str, Any]) -> None:
        """An events.jsonl record (rank 0 writes it)."""
        if self.par.is_main:
            self.run.log_event(event)

    def scale_lr(self, factor: float) -> None:
        """Multiply the peak learning rate from now on (kept in checkpoints, and recorded in
        events.jsonl: what changed a run's LR is on record beside what the guard did)."""
        self.lr_multiplier *= factor
        self.log_event({"step": self.step, "kind": "lr_scale", "factor": factor, "lr_multiplier": self.lr_multiplier})

    def set_total_steps(self, steps: int, final: bool = False) -> None:
        """The run's length: provisional (the loop and the LR schedule follow it) or final, which
        a resumed run keeps (through the checkpoint) and the run folder's config.toml records."""
        self.total_steps = steps
        if final:
            self.length_decided = steps
            cfg = self.cfg
            cfg.train.steps, cfg.train.tokens, cfg.train.time_budget_s = steps, 0, 0.0
            if self.par.is_main:
                self.run.write_config(cfg)

    @contextmanager
    def paused(self, what: str) -> Iterator[None]:
        """Work between steps (evaluation, checkpoints): kept out of step time and throughput."""
        if self._pause_depth:  # nested (a commit inside a save): the outer pause counts it
            yield
            return
        t0 = time.perf_counter()
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            seconds = time.perf_counter() - t0
            self.pause_seconds += seconds
            self.pauses[what] = self.pauses.get(what, 0.0) + seconds

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """The run, in order. Each step: train it; read the guard's events where the step syncs
        anyway; its metrics record; the callbacks' checks of the state a checkpoint would keep;
        evaluation; checkpoint; then the callbacks' work between steps."""
        cbs = self.callbacks
        try:
            cbs.on_run_start(self)
            if cbs.wants("around_collective"):  # e.g. step_time timing Kiln's own collectives
                self.par.collective_timer = lambda fn: cbs.around_collective(self, fn)
            while self.step < self.total_steps:
                result = self.train_step()
                self.step += 1
                # Guard events are read at syncs that happen anyway, and always before a checkpoint,
                # so no checkpoint is written after an unhandled spike.
                if (self.log_due or self.syncs_at(self.step)) and self.handle_guard_events():
                    continue  # rolled back: the steps since the checkpoint are trained again
                if self.log_due:
                    result = result.on_host()  # the one host sync per logging interval
                cbs.on_step_end(self, result)
                if self.log_due:
                    self.last_record = self.log_record(result)
                    cbs.on_log(self, self.last_record)
                cbs.on_step_verify(self)  # e.g. invariants: before anything is evaluated or saved
                if self.evaluation is not None and self.evaluation.due(self, self.step):
                    cbs.on_eval(self, self.evaluation.evaluate(self))
                if self.checkpoints is not None:
                    self.checkpoints.after_step(self)  # -> on_checkpoint once a save is committed
                cbs.on_step_complete(self)
            return self.finish()
        except BaseException as error:
            if self.checkpoints is not None:
                self.checkpoints.on_error(self, error)
            cbs.on_error(self, error)
            raise
        finally:
            self.par.collective_timer = None
            if self.syncs is not None and self.syncs.device.type == "cpu" and self.syncs.compiled:
                # code first called under the dispatch mode stays marked uncompilable for the process
                torch._dynamo.reset()

    def finish(self) -> dict[str, Any]:
        """The run's end: its last evaluation and checkpoint, the callbacks' figures, summary.json."""
        summary = self.base_summary()
        if self.evaluation is not None and (record := self.evaluation.finish(self, summary)) is not None:
            self.callbacks.on_eval(self, record)
        if self.checkpoints is not None:
            self.checkpoints.finish(self)
        self.callbacks.on_run_end(self, summary)
        if self.par.is_main:
            self.run.write_json("summary.json", summary)
        return summary

    def syncs_at(self, step: int) -> bool:
        """Whether the loop synchronises after `step` (evaluates, saves, or a callback does)."""
        return (
            (self.evaluation is not None and self.evaluation.due(self, step))
            or (self.checkpoints is not None and self.checkpoints.due(self, step))
            or self.callbacks.syncs_at(self, step)
        )

    def train_step(self) -> StepResult:
        step, cbs = self.step, self.callbacks
        index = data_index(step, self.skipped)  # the data batch this step trains on
        cbs.on_step_start(self, step, index)
        windows = cbs.on_batch(self, step, index, self.sampler.batch(index))
        batch = self.module.objective.make_batch(windows, index, self.cfg.train.seed, first_index=self.sampler.offset)
        cbs.on_phase(self, "data")
        with self._counting_syncs():
            loss = self.module.forward_backward(batch, on_loss=lambda value: cbs.on_loss(self, step, value))
        if self.module.z_mean is not None:
            self.record_metric("z_loss", self.module.z_mean)  # mean log(Z)^2: what train.z_loss pulls down
        cbs.on_phase(self, "forward_backward")
        cbs.on_after_backward(self, step)
        with self._counting_syncs():
            grad_norm = self.module.clip_grad_norm(self.cfg.optim.grad_clip)
        cbs.on_phase(self, "grad_norm")
        lr = lr_at(step, self.total_steps, self.cfg.optim.lr * self.lr_multiplier, self.cfg.schedule)
        with self._counting_syncs():
            discard = cbs.before_optimizer_step(self, step)  # a device flag, never a host bool
            if self.guard:
                lr *= self.guard.lr_scale(step)
                flagged = self.guard.check(step, loss, grad_norm)
                discard = flagged if discard is None else torch.maximum(discard, flagged)
            self.checkpointer.staged()  # an asynchronous save's copy of the weights is made by now
            self.module.optimizer_step(lr, discard)
            cbs.on_optimizer_step(self, step, discard)
        cbs.on_phase(self, "optimizer")
        return StepResult(step + 1, index, loss, grad_norm, lr)

    def _counting_syncs(self) -> AbstractContextManager:
        """Host syncs inside the step's own work (debug.count_syncs), else nothing."""
        return self.syncs.counting() if self.syncs is not None else nullcontext()

    def log_record(self, result: StepResult) -> dict[str, Any]:
        """The metrics.jsonl record of a logging step: the step's numbers plus what callbacks
        recorded since the last one."""
        record = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
        }
        if isinstance(self.sampler, MixtureSampler):  # drawn from each source so far (skipped batches included)
            drawn = self.sampler.tokens_by_source(data_index(self.step, self.skipped), self.cfg.model.seq_len)
            record.update({f"tokens/{name}": n for name, n in drawn.items()})
        if self.syncs is not None:  # this rank's syncs since the last record (the most of any rank)
            self.recorder.record("host_syncs", self.syncs.take(), "max")
        record.update(self.recorder.collect())
        if "host_syncs" in record:
            record["host_syncs"] = int(record["host_syncs"])
        return record

    def base_summary(self) -> dict[str, Any]:
        from kiln.scaling.flops import param_count

        train_loss = self.last_record.get("loss")
        if train_loss is None:  # nothing logged by this process (a finished run resumed)
            train_loss = self.run.last_metrics().get("loss")  # read from the file's end, not all of it
        return {
            "steps": self.step,
            "tokens": self.tokens_seen,
            "train_loss": train_loss,
            "unigram_entropy": self.data.manifest["val_unigram_entropy"],
            "params": param_count(self.cfg.model, self.data.vocab_size),
            "device": str(self.device),
            "world_size": self.par.info.world_size,
            "layout": self.par.dims.describe(),
            "precision": self.precision,
            "compile": self.cfg.train.compile,
            **({"graph_breaks": breaks - self._breaks_before} if (breaks := graph_breaks()) is not None else {}),
            "seconds": time.perf_counter() - self.started,
            "seconds_between_steps": {k: round(v, 3) for k, v in self.pauses.items()},
        }

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Trainer state saved with each checkpoint (the data batch of a step follows from the step
        and the skipped ranges, so the loader has no state of its own)."""
        return {
            "step": self.step,
            "tokens": self.tokens_seen,
            "precision": self.precision,
            "skipped": self.skipped,
            **({"order": order} if (order := getattr(self.sampler, "order", None)) else {}),  # the window order
            **({"mixture": self.sampler.state} if isinstance(self.sampler, MixtureSampler) else {}),  # its eras
            "data_key": self.data.manifest.get("content_key", self.data.manifest["key"]),
            "guard": self.guard.state_dict() if self.guard else None,
            "callbacks": self.callbacks.state_dict(),
            **({"lr_multiplier": self.lr_multiplier} if self.lr_multiplier != 1.0 else {}),
            **({"total_steps": self.length_decided} if self.length_decided is not None else {}),
        }

    def restore(self, path: Path, keep_events: bool = False) -> None:
        """Model, optimizer, RNG, step, guard and callback states as checkpoint `path` saved them;
        the run folder forgets what was written after it."""
        try:
            saved = self.checkpointer.load(
                path,
                self.module.parts,
                self.module.optimizers,
                rng_seed=self.rng_seed_for(path),
                new_tensors=self.new_tensors,
            )
        except UnusableCheckpoint as unusable:  # a rank found a file it reads damaged; nothing was loaded
            return self.restore(self.checkpointer.fallback(unusable, self.say), keep_events)
        self.step = saved["step"]
        trainer_state = saved["trainer"]
        lineage = self.run.lineage() or {}
        skipped = skipped_ranges(trainer_state)
        for lo, hi in lineage.get("skip_batches", []):  # a fork's ranges (all after its fork point)
            skipped = add_range(skipped, lo, hi)
        self.skipped = skipped
        if self.guard:
            self.guard.load_state_dict(trainer_state.get("guard"))
        self.lr_multiplier = float(trainer_state.get("lr_multiplier", 1.0))
        if "total_steps" in trainer_state:  # a length decided during the run (the time budget)
            self.total_steps = self.length_decided = int(trainer_state["total_steps"])
        self.callbacks.load_state_dict(trainer_state.get("callbacks"))
        if self.par.is_main:
            self.run.truncate_after(self.step, keep=("events.jsonl",) if keep_events else ())

    def rng_seed_for(self, path: Path) -> int:
        """Seed for a rank whose own RNG state the checkpoint lacks (it was saved at another world
        size): distinct per data-parallel rank and per step, like the seeds training starts with."""
        return dropout_seed(self.cfg.train.seed + 7919 * checkpoint_step(path), self.par.dp[0])

    # ------------------------------------------------------------------ the guard's actions
    def handle_guard_events(self) -> bool:
        """Record what the guard saw since the last sync and act; True if the run rolled back."""
        if not self.guard:
            return False
        for event in self.guard.drain():
            action = self.guard.action_for(event["kind"])
            event["data_index"] = data_index(event["step"], self.skipped)
            if action == "record":  # evidence, not an intervention: the update was applied
                event["step"] += 1
                self._record(event, action)
                continue
            state = self.guard.state
            if state.interventions >= self.cfg.guard.max_interventions:
                action = "stop"
                event["reason"] = f"more than guard.max_interventions = {self.cfg.guard.max_interventions}"
            state.interventions += 1
            event["step"] += 1  # report in completed-step numbering, like metrics.jsonl
            if action == "rollback":
                # a loss that is not recovering goes back to before the first spike of the run of them
                first = event["step"] - 1 - (self.cfg.guard.persist - 1 if event["kind"] == "persistent_spike" else 0)
                target = self._rollback_target(first)
                if target is None:
                    action, event["reason"] = "skip", "no checkpoint to roll back to yet"
                else:
                    self._record(event, action)
                    self._rollback(target, event)
                    return True
            self._record(event, action)
            if action == "stop":
                raise GuardStop(
                    f"the training guard stopped the run at step {event['step']}: {event['kind']} "
                    f"(loss {event['loss']:.4g}, grad norm {event['grad_norm']:.4g})"
                    + (f", {event['reason']}" if "reason" in event else "")
                    + f"; see {self.run.events_path}; resume from the last checkpoint with "
                    "--resume (e.g. with a lower optim.lr)"
                )
        return False

    def _record(self, event: dict[str, Any], action: str) -> None:
        event["action"] = action
        self.log_event(event)
        self.say(
            f"  guard: {event['kind']} at step {event['step']} (loss {event['loss']:.4g}, grad norm "
            f"{event['grad_norm']:.4g}) -> {action}"
        )
        self.callbacks.on_guard_event(self, event)

    def _rollback_target(self, spike_step: int) -> Path | None:
        """The newest valid checkpoint taken before the spiking step."""
        if self.checkpoints is not None:
            self.checkpoints.flush(self)  # an asynchronous save in flight is committed (or its failure handled) first
        return newest_checkpoint(self.run.checkpoints, self.par, self.say, max_step=spike_step)

    def _rollback(self, path: Path, event: dict[str, Any]) -> None:
        assert self.guard is not None  # only the guard's events roll back
        cfg, spike_step = self.cfg.guard, event["step"] - 1
        spike_index = event["data_index"]
        interventions = self.guard.state.interventions
        self.restore(path, keep_events=True)  # model, optimizer, RNG, step, guard state as they were then
        state = self.guard.state
        first = data_index(self.step, self.skipped)
        self.skipped = add_range(self.skipped, first, spike_index + cfg.margin)
        state.interventions = interventions
        if cfg.lr_factor != 1.0 and cfg.lr_factor_steps:
            state.lr_factor, state.lr_factor_until = cfg.lr_factor, self.step + cfg.lr_factor_steps
        self.guard.after_rollback()
        skipped = [first, spike_index + cfg.margin]
        rollback = {
            "step": self.step,
            "kind": "rollback",
            "from_step": spike_step + 1,
            "checkpoint": path.name,
            "batches_skipped": skipped,
        }
        self.log_event(rollback)
        self.say(f"  guard: rolled back to {path.name}; data batches {skipped[0]}..{skipped[1]} will be skipped")
        self.callbacks.on_guard_event(self, rollback)
