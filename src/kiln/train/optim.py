"""Optimizer construction and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import OptimConfig, ScheduleConfig
from kiln.train.lowbit import LOW_BIT, build_low_bit
from kiln.train.optim_groups import group_rules, torch_param_groups


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


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, width_mult: float | None = None
) -> torch.optim.Optimizer:
    """One optimizer for `model` (a model part): AdamW, or where a group is Muon's, MuonAdamW
    (kiln.train.muon: each param group updated by its own rule). `width_mult`: µP's width
    multiplier (kiln.model.mup), None for the standard parametrisation."""
    rules = group_rules(cfg, mup=width_mult is not None)
    if rules:
        groups = torch_param_groups(model, cfg, rules, width_mult or 1.0)
    else:
        groups = param_groups(model, cfg.weight_decay)
    if cfg.name in LOW_BIT:
        return build_low_bit(groups, cfg)
    if any(rule.optimizer == "muon" for rule in rules):  # every rank alike, whatever its stage holds
        from kiln.train.muon import MuonAdamW

        return MuonAdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            adjust_lr=cfg.muon_adjust_lr,
            # bfloat16 Newton–Schulz on a GPU (as torch's Muon); float32 on a CPU, where bf16 may be 100x slower
            ns_dtype="bfloat16" if device.type == "cuda" else "float32",
        )
    impl = cfg.implementation
    if impl == "auto":
        # Fused AdamW has kernels for CUDA and CPU: one pass over all parameters per step.
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


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
    """The schedule's `lr` (for `optim.lr`) into every group, times the group's `lr_mult`."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_mult", 1.0)
        if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers keep it a tensor (no recompiles)
            group["lr"].fill_(value)
        else:
            group["lr"] = value
