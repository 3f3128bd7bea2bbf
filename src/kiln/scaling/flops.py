"""FLOPs per token from the model config, and the hardware peak to compute MFU against.

FLOPs per token and parameter counts come from the model family's `ModelSpec` (for the
transformer: 6 N + 12 L d T, PaLM appendix B, see kiln.model.specs); MFU is achieved FLOP/s
over the device's peak.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.model.registry import get_spec, padded_vocab

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets, without sparsity.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,  # bare name: assume the slower PCIe card rather than overstate MFU
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16
}


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training (forward + backward) FLOPs per token, as the model family counts them."""
    return get_spec(cfg.family).flops(cfg, padded_vocab(vocab_size))


def param_count(cfg: ModelConfig, vocab_size: int) -> int:
    """All parameters of the model for a tokenizer of `vocab_size` (embedding padded)."""
    return get_spec(cfg.family).params(cfg, padded_vocab(vocab_size))


def gpu_peak_tflops(name: str) -> float | None:
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if key.lower() in name.lower():
            return GPU_PEAK_TFLOPS[key]
    return None


def _cpu_cache_path() -> Path:
    root = Path(os.environ.get("KILN_HOME", Path.home() / ".cache" / "kiln"))
    return root / "cpu_peak.json"


def _cpu_id() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def measure_cpu_matmul_tflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5, bursts: int = 3) -> float:
    """The best of `bursts` timed bursts: another process busy for part of the measurement
    (a test, a build) then lowers one burst, not the ceiling."""
    gen = torch.Generator().manual_seed(0)  # never touch the global RNG: training's dropout draws from it
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    start = time.perf_counter()
    a @ b
    first = time.perf_counter() - start
    if first > seconds:  # a path without native support (bf16 on some CPUs: ~100x slower): one product tells
        return 2 * n**3 / first / 1e12
    best = 0.0
    for _ in range(bursts):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / bursts:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e12)
    return best


def _read_cache(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, cache: dict[str, float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time


def cpu_peak_tflops(dtype: torch.dtype) -> float:
    """The CPU's matrix-product ceiling for `dtype`, measured once per machine and cached."""
    path = _cpu_cache_path()
    key = f"{_cpu_id()}|{dtype}"
    cache = _read_cache(path)
    if key not in cache:
        cache[key] = measure_cpu_matmul_tflops(dtype)
        _write_cache(path, cache)
    return float(cache[key])


def raise_cpu_peak(dtype: torch.dtype, achieved: float) -> float:
    """A run computed `achieved` TFLOP/s per process, above the cached ceiling: that ceiling was
    measured while the machine was busy. Measure again and keep the highest figure seen."""
    path = _cpu_cache_path()
    key = f"{_cpu_id()}|{dtype}"
    cache = _read_cache(path)
    cache[key] = max(float(cache.get(key, 0.0)), measure_cpu_matmul_tflops(dtype), achieved)
    _write_cache(path, cache)
    return cache[key]


def peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak TFLOP/s or None if unknown, a description of where it came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name)
        if peak is not None and dtype == torch.float32:
            peak /= 2  # TF32 tensor-core peak is half the bf16 one on Ampere and Hopper
        return peak, name if peak is not None else f"{name} (unknown peak: MFU not reported)"
    if device.type == "cpu":
        return cpu_peak_tflops(dtype), f"CPU measured {str(dtype).replace('torch.', '')} matmul ceiling"
    return None, f"{device.type} (unknown peak: MFU not reported)"
