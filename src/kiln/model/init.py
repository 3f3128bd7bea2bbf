"""Deterministic, layout-independent weight initialisation.

Every parameter draws its full value from a generator seeded by (seed, parameter name), so a
model initialised whole on one CPU, sharded by FSDP, split by tensor parallelism or cut into
pipeline stages gets the very same weights. How each parameter is drawn is the family's
`InitRule` (`ModelSpec.init_rule`); `write` puts a full value into a parameter, and the
parallel package passes one that keeps only the local shard of a distributed tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

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
def init_parameters(
    model: nn.Module,
    rule: InitRule,
    cfg: ModelConfig,
    seed: int,
    write: Writer = copy_full,
    from_checkpoint: bool = False,
) -> None:
    """Every parameter by the family's rule, then the files step 0 starts from (`cfg.init_from`, a
    family's pretrained parts). With `from_checkpoint` (a checkpoint overwrites the weights next)
    a file that is gone is skipped: a resumed run does not need what it started from."""
    for name, param in model.named_parameters():
        kind, std = rule(name, param.dim(), cfg)
        if kind == "normal":
            full = torch.empty(param.shape, dtype=torch.float32).normal_(
                0.0, std, generator=param_generator(seed, name)
            )
        elif kind == "ones":
            full = torch.ones(param.shape)
        elif kind == "zeros":
            full = torch.zeros(param.shape)
        else:
            raise ValueError(f"init rule gave {kind!r} for {name}; expected normal, zeros or ones")
        write(param, full.to(param.dtype))
    if cfg.init_from and not (from_checkpoint and not Path(cfg.init_from).is_file()):
        load_initial_weights(model, cfg.init_from, write)
    init_pretrained = getattr(model, "init_pretrained", None)  # parts a family loads from elsewhere
    if init_pretrained is not None:
        init_pretrained(write, optional=from_checkpoint)
    init_buffers = getattr(model, "init_buffers", None)
    if init_buffers is not None:
        init_buffers()


WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")  # torch.compile, activation checkpointing


def open_weights(path: str, source: str):
    """The safetensors file `path` opened for reading, or a one-line error naming `source`."""
    from safetensors import safe_open

    from kiln.errors import ConfigError

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error type for a missing file or a bad header
        raise ConfigError(f"{source} = '{path}' is not a readable safetensors file ({e})") from None


@torch.no_grad()
def load_initial_weights(model: nn.Module, path: str, write: Writer = copy_full) -> None:
    """Overwrite every parameter with its full value from the safetensors file `path` (Kiln's names)."""
    with open_weights(path, "model.init_from") as f:
        names = set(f.keys())
        assign_full_weights(
            model, lambda key: f.get_tensor(key) if key in names else None, f"model.init_from = '{path}'", write
        )


@torch.no_grad()
def load_named_weights(
    model: nn.Module, path: str, parts: tuple[str, ...], source: str, write: Writer = copy_full
) -> None:
    """Overwrite the parameters under the modules `parts` (e.g. an image encoder) from the
    safetensors file `path` (Kiln's names); the rest of the model keeps its values."""
    from kiln.errors import ConfigError

    with open_weights(path, source) as f:
        names = set(f.keys())
        for name, param in model.named_parameters():
            key = name
            for prefix in WRAPPER_PREFIXES:
                key = key.replace(prefix, "")
            if key.split(".", 1)[0] not in parts:
                continue
            if key not in names:
                raise ConfigError(f"{source} = '{path}' has no tensor '{key}'; it must hold {', '.join(parts)}")
            full = f.get_tensor(key)
            if tuple(full.shape) != tuple(param.shape):
                raise ConfigError(
                    f"{source}: '{key}' is {tuple(full.shape)} but the model needs {tuple(param.shape)} "
                    "(another image size, patch size, channel count or width?)"
                )
            write(param, full.to(param.dtype))


@torch.no_grad()
def assign_full_weights(
    model: nn.Module, get: Callable[[str], torch.Tensor | None], source: str, write: Writer = copy_full
) -> None:
    """Every parameter from `get(name)` (Kiln's names, full values). A vocabulary matrix with
    fewer rows than the model's padded one gets zero rows for the padding (a model imported with
    its true vocabulary size)."""
    from kiln.errors import ConfigError

    for name, param in model.named_parameters():
        key = name
        for prefix in WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        full = get(key)
        if full is None:
            raise ConfigError(
                f"{source} has no tensor '{key}' for this model; was it made from a model of another shape?"
            )
        shape = tuple(param.shape)
        if full.shape != shape:
            if full.dim() == len(shape) and full.shape[1:] == shape[1:] and full.shape[0] < shape[0]:
                full = torch.cat([full, full.new_zeros((shape[0] - full.shape[0], *shape[1:]))])
            else:
                raise ConfigError(
                    f"{source}: '{key}' is {tuple(full.shape)} but the model needs {shape}; was it "
                    "made from a model of another shape?"
                )
        write(param, full.to(param.dtype))
