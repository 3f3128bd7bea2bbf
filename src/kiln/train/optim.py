"""Optimizer construction and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import OptimConfig, ScheduleConfig
from kiln.train.lowbit import LOW_BIT, build_low_bit


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never biases or norm gains (1-D tensors).
    Parameters laid out differently (plain tensors, DTensors of different meshes: a mixture of
    experts replicated over tensor-parallel ranks beside split attention) go in separate groups:
    a fused optimizer step takes one layout at a time."""
    by_layout: dict[object, tuple[list, list]] = {}  # layout -> (decay, no decay)
    for p in model.parameters():
        if p.requires_grad:
            decay, no_decay = by_layout.setdefault(getattr(p, "device_mesh", None), ([], []))
            (decay if p.dim() >= 2 else no_decay).append(p)
    if len(by_layout) <= 1:  # one layout: the two groups as always (either may be empty)
        decay, no_decay = next(iter(by_layout.values()), ([], []))
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # several: only non-empty groups (torch's distributed optimizer state dict accepts one empty group)
    return [
        {"params": params, "weight_decay": wd}
        for i, wd in ((0, weight_decay), (1, 0.0))
        for pair in by_layout.values()
        if (params := pair[i])
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.name in LOW_BIT:
        return build_low_bit(param_groups(model, cfg.weight_decay), cfg)
    impl = cfg.implementation
    if impl == "auto":
        # Fused AdamW has kernels for CUDA and CPU: one pass over all parameters per step.
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs
    )


def _warmup(total_steps: int, cfg: ScheduleConfig) -> int:
    return min(cfg.warmup_steps, max(total_steps - 1, 0))


def wsd_decay_start(total_steps: int, cfg: ScheduleConfig) -> int:
    """First step of the WSD decay in a run of `total_steps` (the time budget keeps its length
    from moving the decay before a step already trained)."""
    return total_steps - max(1, round(cfg.decay_fraction * (total_steps - _warmup(total_steps, cfg))))


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then cosine, WSD or constant."""
    min_lr = peak_lr * cfg.min_lr_ratio
    warmup = _warmup(total_steps, cfg)
    if step < warmup:
        return peak_lr * (step + 1) / (warmup + 1)
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "wsd":
        decay_start = wsd_decay_start(total_steps, cfg)
        decay_steps = total_steps - decay_start
        if step < decay_start:
            return peak_lr
        frac = min(1.0, (step - decay_start + 1) / decay_steps)
        return min_lr + (peak_lr - min_lr) * (1.0 - frac)
    frac = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers keep it a tensor (no recompiles)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
