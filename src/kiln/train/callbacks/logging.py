"""Console progress and the metrics log: what a person watching the run sees, and what
`metrics.jsonl` keeps."""

from __future__ import annotations

import time
from typing import Any

from kiln.progress import format_seconds, quiet
from kiln.train.callbacks.base import Callback
from kiln.train.precision import compute_dtype
from kiln.train.step_api import RunView


class ConsoleLog(Callback):
    """The banner at the start, one line per logging interval (loss, LR, gradient norm, tokens/s,
    MFU, ETA) and one per evaluation."""

    name = "console"

    def on_run_start(self, trainer: RunView) -> None:
        from kiln.plan.peak_memory import estimate_memory
        from kiln.scaling.flops import param_count

        cfg, module, vocab = trainer.cfg, trainer.module, trainer.vocab_size
        self._since(trainer)
        accum = -(-trainer.sampler.local_batch // module.micro_batch)
        peak = ""
        if "throughput" not in cfg.callbacks.disabled:  # the figure throughput's MFU is measured against
            from kiln.hardware import peak_tflops

            peak = f"; peak: {peak_tflops(trainer.device, compute_dtype(trainer.precision), cfg.train.tf32)[1]}"
        fpt = trainer.spec.flops(cfg.model, vocab) / 1e6
        trainer.say(
            f"model {cfg.model.family}: {param_count(cfg.model, vocab) / 1e6:.2f}M parameters, "
            f"{cfg.model.n_layers} layers, width {cfg.model.d_model}, context {cfg.model.seq_len}, "
            f"vocabulary {vocab}"
        )
        trainer.say(
            f"training {trainer.total_steps} steps x {cfg.global_batch} sequences ({trainer.tokens_per_step:,} "
            f"tokens/step, {accum} micro-batch(es)) on {trainer.device}, {trainer.precision}"
            f"{', compiled' if cfg.train.compile else ''}; {fpt:.1f} MFLOP/token{peak}"
        )
        if trainer.par.distributed:
            trainer.say(f"layout: {trainer.par.dims.describe()} over {trainer.par.info.world_size} processes")
            if accum > 1 and trainer.par.dims.dp_size > 1 and trainer.par.dims.pp == 1:
                when = "on the last micro-batch" if module.grad_sync == "last_microbatch" else "every micro-batch"
                trainer.say(f"gradients reduced {when} (parallel.grad_sync = '{cfg.parallel.grad_sync}')")
        if trainer.is_main and not quiet():  # the estimate traces the model (~1 s in a fresh process): only where shown
            memory = estimate_memory(cfg, trainer.spec, vocab, trainer.par.dims, trainer.precision, module.grad_sync)
            trainer.say(memory.describe())
        for g in module.optimizer_groups:
            decay = "matrices: optim's" if g["weight_decay"] < 0 else g["weight_decay"]
            hidden = f" (hidden matrices {g['hidden_lr']:.3g}: µP)" if g.get("hidden_lr") else ""
            trainer.say(
                f"  optimizer group {g['name']}: {g['optimizer']}, {g['tensors']} tensors, "
                f"{g['parameters'] / 1e6:.2f}M parameters, lr {g['lr']:.3g}{hidden}, weight decay {decay}"
            )
        if trainer.step:
            trainer.say(f"resuming from step {trainer.step}")

    def _since(self, trainer: RunView) -> None:
        self.t0, self.step0 = time.perf_counter(), trainer.step

    def on_guard_event(self, trainer: RunView, event: dict[str, Any]) -> None:
        if event["kind"] == "rollback":
            self._since(trainer)

    def on_log(self, trainer: RunView, record: dict[str, Any]) -> None:
        total = trainer.total_steps
        done = max(trainer.step - self.step0, 1)
        eta = (total - trainer.step) * (time.perf_counter() - self.t0) / done
        mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "unknown"
        rate = f"{record['tokens_per_s'] / 1e3:.1f}k tok/s  " if "tokens_per_s" in record else ""
        trainer.say(
            f"step {record['step']:>{len(str(total))}}/{total}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  gnorm {record['grad_norm']:.2f}  {rate}MFU {mfu}  "
            f"ETA {format_seconds(eta)}"
        )

    def on_eval(self, trainer: RunView, record: dict[str, Any]) -> None:
        trainer.say(
            f"  eval @ {record['step']}: val_loss {record['val_loss']:.4f}  ppl {record['val_ppl']:.2f}  "
            f"acc {record['val_acc']:.3f}"
        )


class MetricsLog(Callback):
    """One `metrics.jsonl` record per logging step (rank 0 writes)."""

    name = "metrics"

    def on_run_start(self, trainer: RunView) -> None:
        if trainer.is_main and trainer.module.optimizer_groups:  # which parameters each rule updates
            trainer.run.write_json("optimizer_groups.json", trainer.module.optimizer_groups)

    def on_log(self, trainer: RunView, record: dict[str, Any]) -> None:
        if trainer.is_main:
            trainer.run.log_metrics(record)
