"""The training loop: batches -> forward/backward with accumulation -> clip -> step, with
periodic logging, evaluation and checkpoints, and exact resume.

Reads as a recipe: `Trainer.build` assembles data, model, optimizer and objective from the
config; `Trainer.fit` runs the steps. Hooks (objects with any of `on_step_end`, `on_eval`,
`on_checkpoint`) attach monitoring without touching the loop.
"""

from __future__ import annotations

import resource
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
from kiln.model.registry import build_model
from kiln.progress import console, format_seconds, quiet
from kiln.runs.rundir import RunDir
from kiln.scaling.flops import flops_per_token, peak_tflops
from kiln.train import checkpoint as ckpt
from kiln.train.objectives import IGNORE, OBJECTIVES, Objective
from kiln.train.optim import build_optimizer, lr_at, set_lr
from kiln.train.precision import autocast_for, compute_dtype, resolve_device, resolve_precision


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per predicted token, on device (no host sync)
    grad_norm: torch.Tensor
    lr: float


@dataclass
class Trainer:
    cfg: Config
    run: RunDir
    data: Prepared
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    sampler: BatchSampler
    val: torch.Tensor
    device: torch.device
    precision: str
    hooks: list[Any] = field(default_factory=list)
    step: int = 0  # optimizer steps completed
    history: dict[str, list] = field(default_factory=lambda: {"step": [], "loss": [], "val_step": [], "val_loss": []})

    # ------------------------------------------------------------------ assembly
    @classmethod
    def build(cls, cfg: Config, run: RunDir, data: Prepared, resume_state: dict[str, Any] | None = None) -> "Trainer":
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = resolve_device(cfg)
        precision = (resume_state or {}).get("trainer", {}).get("precision") or resolve_precision(cfg, device)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, data.vocab_size).to(device)
        model.init_weights()
        objective = OBJECTIVES[cfg.train.objective](data.tokenizer, data.vocab_size)
        optimizer = build_optimizer(model, cfg.optim, device)
        sampler = BatchSampler(TokenWindows(data.split("train"), cfg.model.seq_len, "train"),
                               cfg.global_batch, cfg.train.seed)
        val_windows = TokenWindows(data.split("val"), cfg.model.seq_len, "validation")
        val = eval_windows(val_windows, cfg.eval.batches * cfg.global_batch)
        return cls(cfg, run, data, model, optimizer, objective, sampler, val, device, precision)

    @property
    def micro_batch(self) -> int:
        return self.cfg.train.micro_batch_size or self.sampler.local_batch

    @property
    def autocast(self):
        return autocast_for(self.device, self.precision)

    def __post_init__(self) -> None:
        # Compile forward and loss together: the loss's log-softmax then fuses with the output
        # projection's epilogue instead of materialising float32 logits (measured in BENCHMARKS.md).
        self.forward_loss = torch.compile(self._forward_loss) if self.cfg.train.compile else self._forward_loss

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.objective.loss_sum(self.model(inputs), targets)

    def state(self) -> dict[str, Any]:
        """Trainer state saved with each checkpoint (the loader needs only the step)."""
        return {"step": self.step, "tokens": self.tokens_seen, "precision": self.precision,
                "data_key": self.data.manifest["key"], "history": self.history}

    @property
    def tokens_seen(self) -> int:
        return self.step * self.cfg.global_batch * self.cfg.model.seq_len

    def restore(self, path: Path) -> None:
        saved = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step = saved["step"]
        self.history = saved["trainer"]["history"]
        self.run.truncate_after(self.step)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> StepResult:
        cfg = self.cfg
        batch = self.objective.make_batch(self.sampler.batch(step), step, cfg.train.seed)
        inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
        # Normalise by the tokens predicted in the whole (global) batch, so accumulation and
        # data parallelism give the gradient of the same mean loss.
        n_predicted = (targets != IGNORE).sum().clamp(min=1)
        total = torch.zeros((), device=self.device)
        for i in range(0, inputs.shape[0], self.micro_batch):
            with self.autocast():
                loss = self.forward_loss(inputs[i:i + self.micro_batch], targets[i:i + self.micro_batch]) / n_predicted
            loss.backward()
            total += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        lr = lr_at(step, cfg.total_steps, cfg.optim.lr, cfg.schedule)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(total, grad_norm, lr)

    # ------------------------------------------------------------------ evaluation, samples
    def evaluate(self) -> dict[str, float]:
        metrics = evaluate_lm(self.model, self.val, self.objective, self.micro_batch, self.device, self.autocast,
                              seed=self.cfg.train.seed)
        record = {"step": self.step, "tokens": self.tokens_seen, **metrics}
        self.run.log_eval(record)
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(metrics["val_loss"])
        self._call("on_eval", record)
        return record

    def samples(self) -> list[dict[str, str]]:
        tok, cfg = self.data.tokenizer, self.cfg
        gen = torch.Generator().manual_seed(cfg.train.seed)
        out = []
        for prompt in cfg.eval.prompts:
            ids = torch.tensor(tok.encode(prompt) or [tok.eos_id], device=self.device)
            with self.autocast():
                full = generate(self.model, ids, cfg.eval.sample_tokens, cfg.model.seq_len, cfg.eval.temperature,
                                cfg.eval.top_k, vocab_size=self.data.vocab_size, generator=gen)
            out.append({"prompt": prompt, "text": tok.decode(full.tolist())})
        self.run.write_text("samples.txt", "".join(f"=== {s['prompt']!r}\n{s['text']}\n\n" for s in out))
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        path = ckpt.save_checkpoint(self.run.checkpoints, self.step, self.model, self.optimizer, self.state(),
                                    keep=self.cfg.checkpoint.keep)
        self._call("on_checkpoint", path)
        return path

    def _call(self, hook: str, *args: Any) -> None:
        for h in self.hooks:
            fn = getattr(h, hook, None)
            if fn is not None:
                fn(self, *args)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg, total = self.cfg, self.cfg.total_steps
        tokens_per_step = cfg.global_batch * cfg.model.seq_len
        fpt = flops_per_token(cfg.model, self.data.vocab_size)
        peak, peak_source = peak_tflops(self.device, compute_dtype(self.precision))
        self._banner(fpt, peak_source)
        start_step, t_start = self.step, time.perf_counter()
        t_last, step_last = t_start, self.step
        paused = 0.0  # seconds spent evaluating and checkpointing, kept out of tokens/s
        rates: list[float] = []
        last: dict[str, Any] = {}
        while self.step < total:
            result = self.train_step(self.step)
            self.step += 1
            done = self.step == total
            if self.step % cfg.log.every == 0 or done:
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
                self.run.log_metrics(last)
                self.history["step"].append(self.step)
                self.history["loss"].append(loss)
                eta = (total - self.step) * (now - t_start) / max(self.step - start_step, 1)
                self._console_line(last, total, eta)
                self._call("on_step_end", last)
            t_pause = time.perf_counter()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and not done:
                ev = self.evaluate()
                self._say(f"  eval @ {self.step}: val_loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}  "
                          f"acc {ev['val_acc']:.3f}")
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not done:
                self.save()
            paused += time.perf_counter() - t_pause
        final_eval = self.evaluate()
        self.save()
        samples = self.samples()
        tok_s = sum(rates) / len(rates) if rates else last.get("tokens_per_s", 0.0)
        tflops = tok_s * fpt / 1e12
        summary = {
            "steps": self.step, "tokens": self.tokens_seen, "train_loss": last.get("loss"),
            **{k: v for k, v in final_eval.items() if k not in ("step", "tokens")},
            "unigram_entropy": self.data.manifest["val_unigram_entropy"],
            "tokens_per_s": tok_s, "tflops": tflops, "mfu": tflops / peak if peak else None,
            "peak_tflops": peak, "peak_source": peak_source, "peak_mem_gb": peak_memory_gb(self.device),
            "params": self.model.num_params(), "flops_per_token": fpt, "device": str(self.device),
            "precision": self.precision, "compile": cfg.train.compile,
            "seconds": time.perf_counter() - t_start, "sample": samples[0] if samples else None,
        }
        self.run.write_json("summary.json", summary)
        if cfg.log.plot:
            from kiln.runs.report import plot_losses

            plot_losses(self.run, self.history)
        return summary

    # ------------------------------------------------------------------ console
    def _say(self, text: str) -> None:
        if not quiet():
            console.print(text)

    def _banner(self, fpt: float, peak_source: str) -> None:
        cfg = self.cfg
        n = self.model.num_params()
        accum = self.sampler.local_batch // self.micro_batch
        self._say(f"model {cfg.model.family}: {n / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, width "
                  f"{cfg.model.d_model}, context {cfg.model.seq_len}, vocabulary {self.data.vocab_size}")
        self._say(f"training {cfg.total_steps} steps x {cfg.global_batch} sequences ({cfg.global_batch * cfg.model.seq_len:,} "
                  f"tokens/step, {accum} micro-batch(es)) on {self.device}, {self.precision}"
                  f"{', compiled' if cfg.train.compile else ''}; {fpt / 1e6:.1f} MFLOP/token; peak: {peak_source}")
        if self.step:
            self._say(f"resuming from step {self.step}")

    def _console_line(self, m: dict[str, Any], total: int, eta: float) -> None:
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "unknown"
        self._say(f"step {m['step']:>{len(str(total))}}/{total}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
                  f"gnorm {m['grad_norm']:.2f}  {m['tokens_per_s'] / 1e3:.1f}k tok/s  MFU {mfu}  "
                  f"ETA {format_seconds(eta)}")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

