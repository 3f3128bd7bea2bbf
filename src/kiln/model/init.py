"""Deterministic, layout-independent weight initialisation.

Every parameter draws its full value from a generator seeded by (seed, parameter name), so a
model initialised whole on one CPU, sharded by FSDP, split by tensor parallelism or cut into
pipeline stages gets the very same weights. How each parameter is drawn is the family's
`InitRule` (`ModelSpec.init_rule`); `write` puts a full value into a parameter, and the
parallel package passes one that keeps only the local shard of a distributed tensor.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from kiln.config import ModelConfig

Writer = Callable[[torch.Tensor, torch.Tensor], None]
InitRule = Callable[[str, int, ModelConfig], tuple[str, float]]


def copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    param.copy_(full)


def param_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def init_parameters(model: nn.Module, rule: InitRule, cfg: ModelConfig, seed: int, write: Writer = copy_full) -> None:
    for name, param in model.named_parameters():
        kind, std = rule(name, param.dim(), cfg)
        if kind == "normal":
            full = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=param_generator(seed, name))
        elif kind == "ones":
            full = torch.ones(param.shape)
        elif kind == "zeros":
            full = torch.zeros(param.shape)
        else:
            raise ValueError(f"init rule gave {kind!r} for {name}; expected normal, zeros or ones")
        write(param, full.to(param.dtype))
    init_buffers = getattr(model, "init_buffers", None)
    if init_buffers is not None:
        init_buffers()
