"""Device and numeric precision: which device trains, and whether matrix products run in bf16.

`train.precision = "auto"` picks bf16 autocast on CUDA GPUs that support it. On CPU it picks
bf16 only where it was measured faster (see BENCHMARKS.md): the CPU's bf16 matrix-product
ceiling must clearly beat fp32, and the model must be wide enough for matrix products, not
per-op overhead, to dominate a step. `apply_matmul_settings` sets the process-wide rest:
TF32 for float32 products on CUDA (`train.tf32`) and deterministic algorithms
(`train.deterministic`).
"""

from __future__ import annotations

import contextlib
import os
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


CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's reproducible workspace setting (":16:8" also qualifies)


def apply_matmul_settings(cfg: Config, device: torch.device) -> None:
    """Process-wide numerics of a training run: TF32 (`train.tf32`) and determinism
    (`train.deterministic`). Call before the first matrix product on the device: PyTorch reads
    CUBLAS_WORKSPACE_CONFIG once, at its first cuBLAS call, and cuBLAS sizes its workspace then
    (exporting it in the shell before starting Python is the surest way).

    TF32: set through the legacy flags, which in torch 2.11-2.13 also write the per-backend
    `fp32_precision` settings, so both views agree. Writing only the new API
    (`torch.backends.cuda.matmul.fp32_precision = "tf32"`) leaves `torch.get_float32_matmul_precision()`
    and `torch.backends.cuda.matmul.allow_tf32` raising "mix of the legacy and new APIs", and
    inductor's autotuning cache and dynamo still read them (pytorch/pytorch#189955)."""
    torch.use_deterministic_algorithms(cfg.train.deterministic)  # both ways: the config decides
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32  # cuDNN convolutions and RNNs
    if cfg.train.deterministic:
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (CUBLAS_DETERMINISTIC, ":16:8"):
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
        torch.backends.cudnn.benchmark = False  # autotuning may pick a different algorithm per run


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
    from kiln.hardware import cpu_peak_tflops

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
