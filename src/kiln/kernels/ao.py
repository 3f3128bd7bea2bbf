"""torchao (an optional extra: low-bit optimizers, float8 training, weight-only quantisation,
2:4 sparsity), imported quietly or refused in one line that says how to get it."""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from types import ModuleType

import torch

from kiln.errors import ConfigError


@contextlib.contextmanager
def _quiet():
    # torchao logs a warning for each prebuilt CUDA extension it cannot load on this machine and
    # torch warns about its pytree registrations: noise for a user who asked for a CPU-safe feature.
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao(module: str, feature: str) -> ModuleType:
    """`torchao.<module>`, or a ConfigError naming `feature` (e.g. "optim.name = 'adamw8bit'")."""
    try:
        with _quiet():
            return importlib.import_module(f"torchao.{module}" if module else "torchao")
    except ImportError as e:
        raise ConfigError(f"{feature} needs torchao ({e}); install it with pip install 'kiln[kernels]'") from None


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass (quantised weights or optimizer states)
    counts its inner tensors (codes, scales, ...), not its nominal shape x dtype."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        return sum(stored_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()
