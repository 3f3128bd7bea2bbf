"""The training loop: batches -> forward/backward with accumulation (or a pipeline schedule)
-> clip -> step, with periodic logging, evaluation and checkpoints, and exact resume.

Reads as a recipe: `Trainer.build` assembles data, model, optimizer and objective from the
config and applies the parallel layout from outside; `Trainer.fit` runs the steps. Hooks
(objects with any of `on_step_end`, `on_eval`, `on_checkpoint`) attach monitoring without
touching the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import Config
from kiln.data.loader import BatchSampler, TokenWindows, eval_windows
from kiln.data.shards import Prepared
from kiln.eval.generate import generate
from kiln.eval.lm import evaluate_lm
from kiln.eval.runner import run_training_suites
from kiln.model.registry import build_model, padded_vocab
from kiln.parallel import pipeline as pp
from kiln.parallel.apply import materialise, parallelize
from kiln.parallel.memory import estimate_memory
from kiln.parallel.runtime import Parallel
from kiln.progress import console, format_seconds, quiet
from kiln.runs.rundir import RunDir
from kiln.scaling.flops import flops_per_token, peak_tflops
from kiln.errors import ConfigError, DataError, KilnError
from kiln.train.checkpoint import Checkpointer, latest_valid_checkpoint
from kiln.train.guard import Guard, GuardStop, add_range, data_index
from kiln.train.watchdog import Watchdog
from kiln.train.objectives import IGNORE, Objective, build_objective
from kiln.train.optim import build_optimizer, lr_at, set_lr
from kiln.train.precision import autocast_for, compute_dtype, peak_memory_gb, resolve_precision


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per predicted token over the global batch, on device (no host sync)
    grad_norm: torch.Tensor
    lr: float


@dataclass
class Trainer:
    cfg: Config
    run: RunDir
    data: Prepared
    par: Parallel
    parts: list[nn.Module]  # the whole model, or this rank's pipeline stages
    optimizers: list[torch.optim.Optimizer]
    objective: Objective
    sampler: BatchSampler
    val: torch.Tensor  # this data-parallel rank's share of the validation windows
    precision: str
    schedule: Any = None  # pipeline schedule when parallel.pp > 1
    hooks: list[Any] = field(default_factory=list)
    step: int = 0  # optimizer steps completed
    history: dict[str, list] = field(default_factory=lambda: {"step": [], "loss": [], "val_step": [], "val_loss": []})

    # ------------------------------------------------------------------ assembly
    @classmethod
    def build(cls, cfg: Config, run: RunDir, data: Prepared, par: Parallel,
              resume_state: dict[str, Any] | None = None) -> "Trainer":
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = par.device
        torch.manual_seed(cfg.train.seed)  # dropout; weights have generators of their own (kiln.model.init)
        saved = (resume_state or {}).get("trainer", {}).get("precision")
        if cfg.train.precision == "auto" and saved:
            precision = saved  # a resumed run keeps the precision "auto" chose for it
        else:  # rank 0 decides (a CPU choice is timed), so every rank computes alike
            precision = par.broadcast(resolve_precision(cfg, device) if par.is_main else None)
        objective = build_objective(cfg, data.tokenizer, data.vocab_size)
        ids, n_stages = pp.stage_ids(cfg, par.dims.pp, par.pp_rank) if par.dims.pp > 1 else ([0], 1)
        parts = []
        for stage in ids:
            with torch.device("meta"):
                model = build_model(cfg.model, data.vocab_size)
            if par.dims.pp > 1:
                model = pp.cut_stage(model, stage, n_stages)
            parallelize(model, cfg, par.dims, par.mesh)
            parts.append(materialise(model, cfg, device))
        optimizers = [build_optimizer(p, cfg.optim, device) for p in parts]
        dp_rank, dp_size = par.dp
        sampler = BatchSampler(TokenWindows(data.split("train"), cfg.model.seq_len, "train"),
                               cfg.global_batch, cfg.train.seed, dp_rank, dp_size)
        val_all = eval_windows(TokenWindows(data.split("val"), cfg.model.seq_len, "validation"),
                               cfg.eval.batches * cfg.global_batch)
        per_rank = len(val_all) // dp_size  # equal shares: every rank runs the same number of forwards
        if per_rank == 0:
            raise DataError(f"the validation split has {len(val_all)} window(s) of model.seq_len + 1 tokens, too few "
                            f"for {dp_size} data-parallel ranks; raise data.val_fraction or eval.batches")
        if par.dims.pp > 1:
            n_micro = cfg.parallel.pp_microbatches
            if sampler.local_batch % n_micro:
                raise ConfigError(f"parallel.pp_microbatches = {n_micro} must divide the per-rank batch of "
                                  f"{sampler.local_batch} sequences (train.batch_size / data-parallel ranks)")
            if per_rank < n_micro:
                raise DataError(f"each data-parallel rank holds {per_rank} validation window(s), fewer than "
                                f"parallel.pp_microbatches = {n_micro}; raise eval.batches or data.val_fraction")
            per_rank -= per_rank % n_micro  # whole pipeline rounds only
        val = val_all[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        trainer = cls(cfg, run, data, par, parts, optimizers, objective, sampler, val, precision)
        if par.dims.pp > 1:
            trainer.schedule = pp.build_schedule(parts, ids, n_stages, par, cfg, trainer._pipeline_loss)
            trainer.stage_ids, trainer.n_stages = ids, n_stages
        return trainer

    def __post_init__(self) -> None:
        # Compile forward and loss together: the loss's log-softmax then fuses with the output
        # projection's epilogue instead of materialising float32 logits (see BENCHMARKS.md).
        self.forward_loss = torch.compile(self._forward_loss) if self.cfg.train.compile else self._forward_loss
        self.checkpointer = Checkpointer(self.run.checkpoints, self.par, keep=self.cfg.checkpoint.keep,
                                         async_save=self.cfg.parallel.async_checkpoint,
                                         keep_every=self.cfg.checkpoint.keep_every)
        self._loss_scale = torch.ones((), device=self.par.device)  # 1 / global predicted tokens, per step
        self.eval_totals: torch.Tensor | None = None  # set while a pipeline evaluation runs
        self.guard = (Guard(self.cfg.guard, self.par.device, judge_from=self.cfg.schedule.warmup_steps)
                      if self.cfg.guard.enabled else None)
        self._fused = all(opt.defaults.get("fused") for opt in self.optimizers)

    @property
    def model(self) -> nn.Module:
        """The whole model (not available when pipeline stages are spread over ranks)."""
        if len(self.parts) != 1 or self.par.dims.pp > 1:
            raise RuntimeError("the model is split into pipeline stages")
        return self.parts[0]

    @property
    def device(self) -> torch.device:
        return self.par.device

    @property
    def micro_batch(self) -> int:
        return self.cfg.train.micro_batch_size or self.sampler.local_batch

    @property
    def autocast(self):
        return autocast_for(self.device, self.precision)

    @property
    def tokens_seen(self) -> int:
        return self.step * self.cfg.global_batch * self.cfg.model.seq_len

    def parameters(self) -> list[torch.Tensor]:
        return [p for part in self.parts for p in part.parameters()]

    def state(self) -> dict[str, Any]:
        """Trainer state saved with each checkpoint (the data batch of a step follows from the step
        and the guard's skipped ranges, so the loader has no state of its own)."""
        return {"step": self.step, "tokens": self.tokens_seen, "precision": self.precision,
                "data_key": self.data.manifest["key"], "history": self.history,
                "guard": self.guard.state_dict() if self.guard else None}

    @property
    def skipped(self) -> list[list[int]]:
        return self.guard.state.skipped if self.guard else []

    def restore(self, path: Path) -> None:
        saved = self.checkpointer.load(path, self.parts, self.optimizers)
        self.step = saved["step"]
        self.history = saved["trainer"]["history"]
        if self.guard:
            self.guard.load_state_dict(saved["trainer"].get("guard"))
        if self.par.is_main:
            self.run.truncate_after(self.step)

    # ------------------------------------------------------------------ one step
    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.objective.loss_sum(self.model(inputs), targets)

    def _pipeline_loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.eval_totals is not None:  # a forward-only evaluation pass
            from kiln.eval.lm import tally_predictions

            return tally_predictions(self.eval_totals, output, targets, self.objective)
        loss = self.objective.loss_sum(output, targets) * self._loss_scale
        return loss * self.par.dims.dp_size  # FSDP averages gradients over data-parallel ranks

    def train_step(self, step: int) -> StepResult:
        cfg, par = self.cfg, self.par
        index = data_index(step, self.skipped)  # the data batch this step trains on
        self._call("on_step_start", step, index)
        batch = self.objective.make_batch(self.sampler.batch(index), index, cfg.train.seed,
                                          first_index=self.sampler.rank * self.sampler.local_batch)
        inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
        # Normalise by the tokens predicted in the whole global batch, so accumulation and data
        # parallelism give the gradient of the same mean loss.
        n_predicted = par.data_sum((targets != IGNORE).sum().float()) / par.dims.pp
        self._loss_scale = 1.0 / n_predicted.clamp(min=1)
        dp_scale = par.dims.dp_size  # FSDP averages gradients; scaling by dp size turns that into a sum
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            with self.autocast():
                first, last = pp.has_first_stage(self.stage_ids), pp.has_last_stage(self.stage_ids, self.n_stages)
                self.schedule.step(*((inputs,) if first else ()), target=targets if last else None, losses=losses)
            total = (torch.stack(losses).detach().sum() / dp_scale if losses
                     else torch.zeros((), device=self.device))
        else:
            total = torch.zeros((), device=self.device)
            for i in range(0, inputs.shape[0], self.micro_batch):
                with self.autocast():
                    loss = self.forward_loss(inputs[i:i + self.micro_batch], targets[i:i + self.micro_batch])
                loss = loss * self._loss_scale
                for hook in self._loss_hooks:
                    loss = hook.on_loss(self, step, loss)
                (loss * dp_scale).backward() if dp_scale != 1 else loss.backward()
                total += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = par.clip_grad_norm(self.parameters(), clip)
        loss = par.data_sum(total) if par.distributed else total
        lr = lr_at(step, cfg.total_steps, cfg.optim.lr, cfg.schedule)
        if self.guard:
            lr *= self.guard.lr_scale(step)
            discard = self.guard.check(step, loss, grad_norm)
        for opt in self.optimizers:
            set_lr(opt, lr)
            if self.guard and self._fused:
                opt.found_inf = discard  # the fused kernel skips a flagged update on the device
                opt.step()
            elif not self.guard or not discard.item():  # other optimizers: a host check
                opt.step()
            opt.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr)

    # ------------------------------------------------------------------ evaluation, samples
    def evaluate(self) -> dict[str, float]:
        if self.schedule is not None:
            from kiln.eval.lm import evaluate_lm_pipeline

            metrics = evaluate_lm_pipeline(self)
        else:
            metrics = evaluate_lm(self.model, self.val, self.objective, self.micro_batch, self.device, self.autocast,
                                  seed=self.cfg.train.seed, reduce=self.par.data_sum if self.par.distributed else None,
                                  first_index=self.par.dp[0] * len(self.val))
        record = {"step": self.step, "tokens": self.tokens_seen, **metrics}
        record.update(run_training_suites(self))  # [eval] suites -> eval/step-N.json; nothing when empty
        if self.par.is_main:
            self.run.log_eval(record)
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(metrics["val_loss"])
        self._call("on_eval", record)
        return record

    def samples(self) -> list[dict[str, str]]:
        """Generations from the fixed prompts; every rank generates in lockstep (the sharded
        forward needs them all) and rank 0 writes them."""
        if self.schedule is not None or self.par.dims.tp > 1:
            # Pipeline stages hold parts of the model, and sequence parallelism needs lengths
            # divisible by tp: sample from the checkpoint with `kiln sample` instead.
            return []
        if self.objective.masked:  # an encoder does not generate: show it filling masks instead
            from kiln.eval.fill import fill_mask_demo

            out = [fill_mask_demo(self.model, self.val[0], self.objective, self.data.tokenizer, self.device,
                                  self.autocast, self.cfg.train.seed)]
            if self.par.is_main:
                self.run.write_text("samples.txt", f"=== {out[0]['prompt']}\n{out[0]['text']}\n")
            return out
        tok, cfg = self.data.tokenizer, self.cfg
        gen = torch.Generator().manual_seed(cfg.train.seed)
        out = []
        for prompt in cfg.eval.prompts:
            ids = torch.tensor(tok.encode(prompt) or [tok.eos_id], device=self.device)
            with self.autocast():
                full = generate(self.model, ids, cfg.eval.sample_tokens, cfg.model.seq_len, cfg.eval.temperature,
                                cfg.eval.top_k, vocab_size=self.data.vocab_size, generator=gen)
            out.append({"prompt": prompt, "text": tok.decode(full.tolist())})
        if self.par.is_main:
            self.run.write_text("samples.txt", "".join(f"=== {s['prompt']!r}\n{s['text']}\n\n" for s in out))
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Checkpoint now. A failed write (disk full, ...) leaves every earlier checkpoint intact;
        the run stops with a clear message or, with checkpoint.on_error = "continue", goes on."""
        try:
            path = self.checkpointer.save(self.step, self.parts, self.optimizers, self.state())
        except OSError as e:
            message = (f"writing checkpoint step {self.step} to {self.run.checkpoints} failed ({e.strerror or e}); "
                       "earlier checkpoints are intact")
            if self.par.is_main:
                self.run.append(self.run.path / "events.jsonl", {"step": self.step, "kind": "checkpoint_failed",
                                                                 "error": str(e), "action": self.cfg.checkpoint.on_error})
            if self.cfg.checkpoint.on_error == "stop":
                raise KilnError(message + "; free space and resume with --resume") from None
            self._say(f"  warning: {message}; continuing (checkpoint.on_error = continue)")
            return None
        self._call("on_checkpoint", path)
        return path

    @property
    def _loss_hooks(self) -> list[Any]:
        return [h for h in self.hooks if hasattr(h, "on_loss")]

    # ------------------------------------------------------------------ the guard's actions
    def handle_guard_events(self) -> bool:
        """Record what the guard saw since the last sync and act; True if the run rolled back."""
        if not self.guard:
            return False
        for event in self.guard.drain():
            action = self.guard.action_for(event["kind"])
            state = self.guard.state
            if state.interventions >= self.cfg.guard.max_interventions:
                action = "stop"
                event["reason"] = f"more than guard.max_interventions = {self.cfg.guard.max_interventions}"
            state.interventions += 1
            event["data_index"] = data_index(event["step"], state.skipped)
            event["step"] += 1  # report in completed-step numbering, like metrics.jsonl
            if action == "rollback":
                target = self._rollback_target(event["step"] - 1)
                if target is None:
                    action, event["reason"] = "skip", "no checkpoint to roll back to yet"
                else:
                    self._record(event, action)
                    self._rollback(target, event)
                    return True
            self._record(event, action)
            if action == "stop":
                raise GuardStop(f"the training guard stopped the run at step {event['step']}: {event['kind']} "
                                f"(loss {event['loss']:.4g}, grad norm {event['grad_norm']:.4g})"
                                + (f", {event['reason']}" if "reason" in event else "")
                                + f"; see {self.run.path / 'events.jsonl'}; resume from the last checkpoint with "
                                "--resume (e.g. with a lower optim.lr)")
        return False

    def _record(self, event: dict[str, Any], action: str) -> None:
        event["action"] = action
        if self.par.is_main:
            self.run.append(self.run.path / "events.jsonl", event)
        self._say(f"  guard: {event['kind']} at step {event['step']} (loss {event['loss']:.4g}, grad norm "
                  f"{event['grad_norm']:.4g}) -> {action}")

    def _rollback_target(self, spike_step: int) -> Path | None:
        """The newest valid checkpoint taken before the spiking step."""
        self.checkpointer.wait()
        folder = self.run.checkpoints
        path = self.par.main_first(lambda: latest_valid_checkpoint(folder, self._say, max_step=spike_step))
        return self.par.broadcast(path)

    def _rollback(self, path: Path, event: dict[str, Any]) -> None:
        cfg, spike_step = self.cfg.guard, event["step"] - 1
        spike_index = event["data_index"]
        interventions = self.guard.state.interventions
        self.restore(path)  # model, optimizer, RNG, step and the guard state as they were then
        state = self.guard.state
        first = data_index(self.step, state.skipped)
        state.skipped = add_range(state.skipped, first, spike_index + cfg.margin)
        state.interventions = interventions
        if cfg.lr_factor != 1.0 and cfg.lr_factor_steps:
            state.lr_factor, state.lr_factor_until = cfg.lr_factor, self.step + cfg.lr_factor_steps
        self.guard.after_rollback()
        skipped = [first, spike_index + cfg.margin]
        if self.par.is_main:
            self.run.append(self.run.path / "events.jsonl", {"step": self.step, "kind": "rollback",
                                                             "from_step": spike_step + 1, "checkpoint": path.name,
                                                             "batches_skipped": skipped})
        self._say(f"  guard: rolled back to {path.name}; data batches {skipped[0]}..{skipped[1]} will be skipped")

    def _call(self, hook: str, *args: Any) -> None:
        for h in self.hooks:
            fn = getattr(h, hook, None)
            if fn is not None:
                fn(self, *args)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg, total = self.cfg, self.cfg.total_steps
        tokens_per_step = cfg.global_batch * cfg.model.seq_len
        fpt = flops_per_token(cfg.model, padded_vocab(self.data.vocab_size))
        peak, peak_source = peak_tflops(self.device, compute_dtype(self.precision))
        if peak is not None:
            peak *= self.par.info.world_size  # MFU of the whole job
        self._banner(fpt, peak_source)
        start_step, t_start = self.step, time.perf_counter()
        t_last, step_last = t_start, self.step
        paused = 0.0  # seconds spent evaluating and checkpointing, kept out of tokens/s
        rates: list[float] = []
        last: dict[str, Any] = {}
        watchdog = Watchdog.start(self.cfg.guard, self.run.path, self.par.info.rank)
        try:
            while self.step < total:
                watchdog.beat()
                result = self.train_step(self.step)
                self.step += 1
                done = self.step == total
                log_now = self.step % cfg.log.every == 0 or done
                eval_now = bool(cfg.eval.every) and self.step % cfg.eval.every == 0 and not done
                save_now = bool(cfg.checkpoint.every) and self.step % cfg.checkpoint.every == 0 and not done
                # Guard events are read at syncs that happen anyway, and always before a checkpoint,
                # so no checkpoint is written after an unhandled spike.
                if (log_now or eval_now or save_now) and self.handle_guard_events():
                    t_last, step_last, paused = time.perf_counter(), self.step, 0.0
                    continue
                if log_now:
                    loss = result.loss.item()  # the one host sync per logging interval
                    now = time.perf_counter()
                    rate = (self.step - step_last) * tokens_per_step / max(now - t_last - paused, 1e-9)
                    if step_last > start_step or self.step - start_step > 1:
                        rates.append(rate)  # the first interval carries warm-up and compilation
                    t_last, step_last, paused = now, self.step, 0.0
                    tflops = rate * fpt / 1e12
                    last = {"step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": result.lr,
                            "grad_norm": float(result.grad_norm), "tokens_per_s": rate, "tflops": tflops,
                            "mfu": tflops / peak if peak else None, "peak_mem_gb": peak_memory_gb(self.device)}
                    if self.par.is_main:
                        self.run.log_metrics(last)
                    self.history["step"].append(self.step)
                    self.history["loss"].append(loss)
                    eta = (total - self.step) * (now - t_start) / max(self.step - start_step, 1)
                    self._console_line(last, total, eta)
                    self._call("on_step_end", last)
                t_pause = time.perf_counter()
                if eval_now:
                    ev = self.evaluate()
                    self._say(f"  eval @ {self.step}: val_loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}  "
                              f"acc {ev['val_acc']:.3f}")
                if save_now:
                    self.save()
                if eval_now or save_now:
                    watchdog.beat()  # evaluation and checkpoint time is not step time
                paused += time.perf_counter() - t_pause
        finally:
            watchdog.stop()
        final_eval = self.evaluate()
        self.save()
        self.checkpointer.wait()
        samples = self.samples()
        tok_s = sum(rates) / len(rates) if rates else last.get("tokens_per_s", 0.0)
        tflops = tok_s * fpt / 1e12
        summary = {
            "steps": self.step, "tokens": self.tokens_seen, "train_loss": last.get("loss"),
            **{k: v for k, v in final_eval.items() if k not in ("step", "tokens")},
            "unigram_entropy": self.data.manifest["val_unigram_entropy"],
            "tokens_per_s": tok_s, "tflops": tflops, "mfu": tflops / peak if peak else None,
            "peak_tflops": peak, "peak_source": peak_source, "peak_mem_gb": peak_memory_gb(self.device),
            "params": self.num_params(), "flops_per_token": fpt, "device": str(self.device),
            "world_size": self.par.info.world_size, "layout": self.par.dims.describe(),
            "precision": self.precision, "compile": cfg.train.compile,
            "seconds": time.perf_counter() - t_start, "sample": samples[0] if samples else None,
        }
        if self.par.is_main:
            self.run.write_json("summary.json", summary)
            if cfg.log.plot:
                from kiln.runs.report import plot_losses

                plot_losses(self.run, self.history, self.data.manifest["val_unigram_entropy"])
        return summary

    def num_params(self) -> int:
        from kiln.scaling.flops import model_params

        return model_params(self.cfg.model, self.data.vocab_size)

    # ------------------------------------------------------------------ console
    def _say(self, text: str) -> None:
        if not quiet() and self.par.is_main:
            console.print(text)

    def _banner(self, fpt: float, peak_source: str) -> None:
        cfg = self.cfg
        accum = -(-self.sampler.local_batch // self.micro_batch)
        self._say(f"model {cfg.model.family}: {self.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, "
                  f"width {cfg.model.d_model}, context {cfg.model.seq_len}, vocabulary {self.data.vocab_size}")
        self._say(f"training {cfg.total_steps} steps x {cfg.global_batch} sequences ({cfg.global_batch * cfg.model.seq_len:,} "
                  f"tokens/step, {accum} micro-batch(es)) on {self.device}, {self.precision}"
                  f"{', compiled' if cfg.train.compile else ''}; {fpt / 1e6:.1f} MFLOP/token; peak: {peak_source}")
        if self.par.distributed:
            self._say(f"layout: {self.par.dims.describe()} over {self.par.info.world_size} processes")
        self._say(estimate_memory(cfg, self.data.vocab_size, self.par.dims, self.precision).describe())
        if self.step:
            self._say(f"resuming from step {self.step}")

    def _console_line(self, m: dict[str, Any], total: int, eta: float) -> None:
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "unknown"
        self._say(f"step {m['step']:>{len(str(total))}}/{total}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
                  f"gnorm {m['grad_norm']:.2f}  {m['tokens_per_s'] / 1e3:.1f}k tok/s  MFU {mfu}  "
                  f"ETA {format_seconds(eta)}")
