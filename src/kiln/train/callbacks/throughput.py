"""Throughput and model FLOP utilisation: tokens/s, achieved TFLOP/s, MFU and peak memory in
every metrics record, and their run averages in the summary.

FLOPs per token come from the model family's spec (kiln.scaling.flops); the peak is the GPU's
datasheet bf16 figure or, on CPU, the measured matrix-product ceiling of the precision the run
computes in (kiln.hardware). Time spent evaluating and checkpointing is not counted, and the first
interval of a process (warm-up, compilation) is kept out of the averages.
"""

from __future__ import annotations

import time
from typing import Any

from kiln.train.callbacks.base import Callback
from kiln.train.precision import compute_dtype, peak_memory_gb
from kiln.train.step_api import RunView


class Throughput(Callback):
    name = "throughput"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.peak: float | None = None
        self.peak_source = ""
        self.rate_sum, self.rate_count = 0.0, 0  # a running mean: nothing kept per interval

    def on_run_start(self, trainer: RunView) -> None:
        from kiln.hardware import peak_tflops

        self.fpt = trainer.spec.flops(trainer.cfg.model, trainer.vocab_size)
        self.peak, self.peak_source = peak_tflops(
            trainer.device, compute_dtype(trainer.precision), tf32=trainer.cfg.train.tf32
        )
        if self.peak is not None:
            self.peak *= trainer.par.info.world_size  # MFU of the whole job
        self.start_step = trainer.step
        self._mark(trainer)

    def _mark(self, trainer: RunView) -> None:
        self.t_last, self.step_last, self.pause_last = time.perf_counter(), trainer.step, trainer.pause_seconds

    def on_guard_event(self, trainer: RunView, event: dict[str, Any]) -> None:
        if event["kind"] == "rollback":
            self._mark(trainer)

    def on_step_end(self, trainer: RunView, result) -> None:
        if not trainer.log_due:
            return
        now = time.perf_counter()
        seconds = now - self.t_last - (trainer.pause_seconds - self.pause_last)
        rate = (trainer.step - self.step_last) * trainer.tokens_per_step / max(seconds, 1e-9)
        if self.step_last > self.start_step or trainer.step - self.start_step > 1:
            self.rate_sum += rate  # the first interval carries warm-up and compilation
            self.rate_count += 1
        self._mark(trainer)
        tflops = rate * self.fpt / 1e12
        trainer.record_metric("tokens_per_s", rate, reduce="min")  # the slowest rank sets the pace
        trainer.record_metric("tflops", tflops, reduce="min")
        if self.peak:
            trainer.record_metric("mfu", tflops / self.peak, reduce="min")
        trainer.record_metric("peak_mem_gb", peak_memory_gb(trainer.device), reduce="max")

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        tok_s = self.rate_sum / self.rate_count if self.rate_count else trainer.last_record.get("tokens_per_s", 0.0)
        tflops = tok_s * self.fpt / 1e12
        if self.peak and tflops > self.peak and trainer.device.type == "cpu":
            from kiln.hardware import raise_cpu_peak

            world = trainer.par.info.world_size
            self.peak = raise_cpu_peak(compute_dtype(trainer.precision), tflops / world) * world
            self.peak_source += " (re-measured: the cached one was taken on a busy machine)"
        summary.update(
            {
                "tokens_per_s": tok_s,
                "tflops": tflops,
                "mfu": tflops / self.peak if self.peak else None,
                "peak_tflops": self.peak,
                "peak_source": self.peak_source,
                "peak_mem_gb": peak_memory_gb(trainer.device),
                "flops_per_token": self.fpt,
            }
        )
