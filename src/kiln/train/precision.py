"""Device and numeric precision: which device trains, and whether matrix products run in bf16.

`train.precision = "auto"` picks bf16 autocast on CUDA GPUs that support it. On CPU it picks
bf16 only where it was measured faster (see BENCHMARKS.md): the CPU's bf16 matrix-product
ceiling must clearly beat fp32, and the model must be wide enough for matrix products, not
per-op overhead, to dominate a step.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable

import torch

from kiln.config import Config
from kiln.errors import ConfigError

CPU_BF16_MIN_WIDTH = 256  # below this width bf16 autocast measured no faster on CPU (BENCHMARKS.md)
CPU_BF16_MIN_SPEEDUP = 1.5  # bf16/fp32 matmul ceiling ratio needed to call the CPU's bf16 fast


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA GPU is visible; use train.device = 'cpu' or 'auto'")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """'bf16' or 'fp32'."""
    p = cfg.train.precision
    if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision = 'bf16' but this GPU has no bf16 support; use 'fp32' or 'auto'")
    if p != "auto":
        return p
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if cfg.model.d_model < CPU_BF16_MIN_WIDTH:
        return "fp32"
    from kiln.scaling.flops import cpu_peak_tflops

    fast = cpu_peak_tflops(torch.bfloat16) >= CPU_BF16_MIN_SPEEDUP * cpu_peak_tflops(torch.float32)
    return "bf16" if fast else "fp32"


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
