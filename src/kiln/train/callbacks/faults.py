"""Fault injection from the `[faults]` config section: the failures large runs meet, on purpose,
to measure how the guard and `kiln doctor` react (bench/faults.py) — never for real training.

Every fault is deterministic in the step (completed-step numbering, as in metrics.jsonl), so a
resumed run meets the same faults at the same steps. What each does:

    nonfinite_loss      the step's loss is multiplied by NaN (so are its gradients)
    nonfinite_grad      one gradient element of the step is set to inf after backward
    corrupt_batch       the step trains on uniformly random tokens (a loss spike)
    lr_high / lr_low    from that step on, the peak LR is multiplied by the factor (logged LR too)
    repeat_batch        from that step on, every step trains on that step's data batch
    entropy_collapse    from that step on, `layer`'s query and key projections are scaled up 30x,
                        so its attention puts all weight on one key
    dead_units          from that step on, `dead_fraction` of `layer`'s MLP hidden units get a
                        pre-activation of -30 (no output, no gradient)
    slow_steps          these steps sleep slow_s seconds inside the step
    slow_rank           this data-parallel rank sleeps slow_rank_s inside every step
    throttle_rank       after each forward and each backward of each leaf module, this data-
                        parallel rank sleeps (throttle_factor - 1) x its time: a device that many
                        times slower in both passes (mixed clusters)
    hang                this step sleeps hang_s seconds (the watchdog's case)
    loader_stall        reading these steps' batches sleeps stall_s seconds
    corrupt_checkpoint  the checkpoint of this step is damaged right after it is committed
    tokenizer_mismatch  the run's tokenizer.json is replaced by one the shards were not made with
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kiln.config import FAULT_TRIGGERS, FaultsConfig
from kiln.parallel.tensors import local as _local
from kiln.parallel.tensors import plain_name as _clean
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView

COLLAPSE_SCALE = 30.0
DEAD_BIAS = -30.0


def any_fault(cfg: FaultsConfig) -> bool:
    return any(getattr(cfg, name) not in (0, [], False, -1) for name in FAULT_TRIGGERS)


class Faults(Callback):
    name = "faults"

    def __init__(self, cfg: FaultsConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self.current = 0  # the step being trained (completed-step numbering)
        self.lr_applied: set[str] = set()  # kept in checkpoints, like the trainer's LR multiplier
        self.hooks: list[Any] = []
        self._started: dict[torch.nn.Module, float] = {}  # throttle: when each leaf began its pass

    # ---------------------------------------------------------------- setup
    def on_run_start(self, trainer: RunView) -> None:
        cfg = self.cfg
        modules = {_clean(n): m for n, m in trainer.module.named_modules()}
        layer = f"layers.{cfg.layer}"
        if cfg.entropy_collapse:
            for proj in ("attn.wq", "attn.wk"):
                if f"{layer}.{proj}" in modules:
                    self.hooks.append(modules[f"{layer}.{proj}"].register_forward_hook(self._scale_hook))
        if cfg.dead_units and f"{layer}.mlp.w1" in modules:
            self.hooks.append(modules[f"{layer}.mlp.w1"].register_forward_hook(self._dead_hook))
        if cfg.tokenizer_mismatch and trainer.is_main:
            self._swap_tokenizer(trainer.run.tokenizer_path)
        if cfg.throttle_rank >= 0 and trainer.par.dp[0] == cfg.throttle_rank:
            # Under data parallelism leaf modules hold no collectives (FSDP's run in the blocks'
            # and root's hooks), so their time is this rank's own compute, never a wait for
            # another rank. (Under tensor parallelism the leaf Linears' own hooks communicate, and
            # that time is throttled too: a data-parallel fault.)
            for module in trainer.module.parts:
                for leaf in (m for m in module.modules() if not any(True for _ in m.children())):
                    self.hooks.append(leaf.register_forward_pre_hook(self._throttle_start))
                    self.hooks.append(leaf.register_forward_hook(self._throttle_forward))
                    # (an embedding's input, token ids, takes no gradient: no backward hook there)
                    if any(p.requires_grad for p in leaf.parameters(recurse=False)) and not isinstance(
                        leaf, torch.nn.Embedding
                    ):
                        self.hooks.append(leaf.register_full_backward_pre_hook(self._throttle_start))
                        self.hooks.append(leaf.register_full_backward_hook(self._throttle_end))

    # Both passes are slowed: FSDP's collectives pair the ranks up within each, so a device slowed
    # in the forward only would look twice as slow there and not at all in the backward.
    def _throttle_start(self, module, *_) -> None:
        self._started[module] = time.perf_counter()  # by module: backward branches interleave

    def _throttle_forward(self, module, *_) -> None:
        if torch.is_grad_enabled():  # training, not evaluation
            self._throttle_end(module)

    def _throttle_end(self, module, *_) -> None:
        """Sleep what a device `throttle_factor` times slower would add to this pass of `module`."""
        started = self._started.pop(module, None)
        if started is not None:
            time.sleep((self.cfg.throttle_factor - 1) * (time.perf_counter() - started))

    def _scale_hook(self, module, args, output):
        if self.cfg.entropy_collapse and self.current >= self.cfg.entropy_collapse:
            return output * COLLAPSE_SCALE
        return output

    def _dead_hook(self, module, args, output):
        if not (self.cfg.dead_units and self.current >= self.cfg.dead_units):
            return output
        n = output.shape[-1]
        dead = torch.zeros(n, device=output.device, dtype=output.dtype)
        dead[: int(n * self.cfg.dead_fraction)] = DEAD_BIAS
        return output + dead

    @staticmethod
    def _swap_tokenizer(path: Path) -> None:
        """Reverse the vocabulary's ids: same tokens, every id now means another token."""
        data = json.loads(path.read_text())
        vocab = data.get("model", {}).get("vocab")
        if isinstance(vocab, dict) and vocab:
            ids = sorted(vocab.values())
            data["model"]["vocab"] = {tok: ids[len(ids) - 1 - ids.index(i)] for tok, i in vocab.items()}
        path.write_text(json.dumps(data))

    # ---------------------------------------------------------------- per step
    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        cfg = self.cfg
        self.current = step + 1
        for start, factor, key in ((cfg.lr_high, cfg.lr_high_factor, "high"), (cfg.lr_low, cfg.lr_low_factor, "low")):
            if start and self.current >= start and key not in self.lr_applied:
                trainer.scale_lr(factor)
                self.lr_applied.add(key)

    def on_batch(self, trainer: RunView, step: int, data_index: int, windows: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.current in cfg.loader_stall:
            time.sleep(cfg.stall_s)
        if cfg.repeat_batch and self.current >= cfg.repeat_batch:
            from kiln.data.skips import data_index as index_of

            windows = trainer.sampler.batch(index_of(cfg.repeat_batch - 1, trainer.skipped))
        if self.current in cfg.corrupt_batch:
            g = torch.Generator().manual_seed(trainer.cfg.train.seed * 1009 + self.current)
            windows = torch.randint(0, trainer.vocab_size, windows.shape, generator=g)
        return windows

    def on_loss(self, trainer: RunView, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step + 1 in self.cfg.nonfinite_loss:
            return loss * float("nan")
        return loss

    def on_after_backward(self, trainer: RunView, step: int) -> None:
        cfg = self.cfg
        if step + 1 in cfg.nonfinite_grad:
            for p in trainer.module.parameters():
                if p.grad is not None:
                    _local(p.grad).view(-1)[0] = float("inf")
                    break
        if step + 1 in cfg.slow_steps:
            time.sleep(cfg.slow_s)
        if cfg.slow_rank >= 0 and trainer.par.dp[0] == cfg.slow_rank:
            time.sleep(cfg.slow_rank_s)

        if cfg.hang and step + 1 == cfg.hang:
            time.sleep(cfg.hang_s)

    def on_checkpoint(self, trainer: RunView, step: int, path: Path) -> None:
        if step != self.cfg.corrupt_checkpoint or not trainer.is_main:
            return
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json" and p.stat().st_size > 64
        )
        target = next((p for p in files if p.name.startswith("model")), files[0] if files else None)
        if target is not None:  # flip bytes in the middle: the checksum no longer matches
            with open(target, "r+b") as f:
                f.seek(target.stat().st_size // 2)
                chunk = f.read(16)
                f.seek(target.stat().st_size // 2)
                f.write(bytes(b ^ 0xFF for b in chunk))

    def state_dict(self) -> dict[str, Any]:
        return {"lr_applied": sorted(self.lr_applied)}  # (never empty: a rollback resets it too)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_applied = set(state.get("lr_applied", []))

    # ---------------------------------------------------------------- the end
    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        self._remove()

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
