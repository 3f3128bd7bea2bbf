"""The hardware's peak matrix-product throughput, the denominator of MFU: GPU datasheet peaks by
device name (bf16, TF32 and float32 columns), and on CPU a matmul micro-benchmark measured once
per machine and cached under $KILN_HOME (or ~/.cache/kiln)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import torch

from kiln.fileio import write_atomic


class GpuPeaks(NamedTuple):
    """Peak TFLOP/s of one GPU, dense (without 2:4 sparsity, which the datasheets' starred figures
    double): bf16 on tensor cores, float32 products as TF32 on tensor cores (None: no TF32), and
    float32 on the CUDA cores (TF32 off)."""

    bf16: float
    tf32: float | None
    fp32: float


# Keyed by a part of `torch.cuda.get_device_name()` ("NVIDIA H100 80GB HBM3" is the SXM card,
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB",
# "NVIDIA L40S", "NVIDIA B200"); the longest key found in the name wins. Sources, NVIDIA's datasheets
# (halving the "with sparsity" tensor figures): H100 Tensor Core GPU datasheet (SXM / NVL / PCIe:
# BF16 1,979 / 1,671 / 1,513*, TF32 989 / 835 / 756*, FP32 67 / 60 / 51); H200 datasheet (SXM /
# NVL: BF16 1,979 / 1,671*, TF32 989 / 835*, FP32 67 / 60); GH200 as the H100 SXM; A100 datasheet
# (BF16 312, TF32 156, FP32 19.5, SXM and PCIe alike); L40S / L40 datasheets (BF16 362 / 181, TF32
# 183 / 90.5, FP32 91.6 / 90.5); L4 (BF16 242*, TF32 120*, FP32 30.3); A10 (BF16 125, TF32 62.5,
# FP32 31.2); HGX B200 / GB200 NVL72 per GPU (BF16 4.5 / 5 PF*, TF32 2.2 / 2.5 PF*, FP32 75 / 80).
# GeForce: the Ada / Ampere whitepapers' figures with float32 accumulation.
GPU_PEAKS: dict[str, GpuPeaks] = {
    "H200 NVL": GpuPeaks(835.0, 417.5, 60.0),
    "H200": GpuPeaks(989.0, 494.5, 67.0),
    "H100 SXM": GpuPeaks(989.0, 494.5, 67.0),
    "H100 80GB HBM3": GpuPeaks(989.0, 494.5, 67.0),  # the SXM card's name in torch
    "H100 NVL": GpuPeaks(835.0, 417.5, 60.0),
    "H100 PCIe": GpuPeaks(756.0, 378.0, 51.0),
    "H100": GpuPeaks(756.0, 378.0, 51.0),  # bare name: assume the slower PCIe card rather than overstate MFU
    "GH200": GpuPeaks(989.0, 494.5, 67.0),
    "GB200": GpuPeaks(2500.0, 1250.0, 80.0),
    "B200": GpuPeaks(2250.0, 1100.0, 75.0),
    "A100": GpuPeaks(312.0, 156.0, 19.5),
    "A800": GpuPeaks(312.0, 156.0, 19.5),
    "L40S": GpuPeaks(362.0, 183.0, 91.6),
    "L40": GpuPeaks(181.0, 90.5, 90.5),
    "L4": GpuPeaks(121.0, 60.0, 30.3),
    "A10G": GpuPeaks(70.0, 35.0, 31.2),  # AWS's variant: no NVIDIA datasheet; bf16 as before, TF32 its half
    "A10": GpuPeaks(125.0, 62.5, 31.2),
    "RTX 4090": GpuPeaks(165.0, 82.6, 82.6),
    "RTX 3090": GpuPeaks(71.0, 35.6, 35.6),
    "V100": GpuPeaks(125.0, None, 15.7),  # fp16 tensor cores (no bf16, no TF32 on Volta)
}
GPU_PEAK_TFLOPS = {name: peaks.bf16 for name, peaks in GPU_PEAKS.items()}  # the bf16 column


def gpu_peaks(name: str) -> GpuPeaks | None:
    """The peaks of the GPU `torch.cuda.get_device_name()` calls `name`, or None if unknown. The
    most specific (longest) key found in the name wins: "NVIDIA H200 NVL" is the "H200 NVL", not
    the "H200"."""
    for key in sorted(GPU_PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAKS[key]
    return None


def gpu_peak(name: str, dtype: torch.dtype = torch.bfloat16, tf32: bool = True) -> tuple[float | None, str]:
    """(peak TFLOP/s of products in `dtype` on the GPU called `name`, or None if unknown; the units
    it assumes). float32 products run on TF32 tensor cores when `tf32` (train.tf32) and the GPU has
    them, else on the CUDA cores; bf16 and fp16 on the tensor cores."""
    peaks = gpu_peaks(name)
    if dtype == torch.float32:
        if tf32 and (peaks is None or peaks.tf32 is not None):
            return (peaks.tf32 if peaks else None), "TF32 tensor cores"
        return (peaks.fp32 if peaks else None), "fp32 CUDA cores"
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))
    return (peaks.bf16 if peaks else None), f"{short} tensor cores"


def gpu_peak_tflops(name: str, dtype: torch.dtype = torch.bfloat16, tf32: bool = True) -> float | None:
    return gpu_peak(name, dtype, tf32)[0]


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
        write_atomic(path, json.dumps(cache, indent=1))
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


def peak_tflops(device: torch.device, dtype: torch.dtype, tf32: bool = True) -> tuple[float | None, str]:
    """(peak TFLOP/s or None if unknown, a description of where it came from and the units it
    assumes). On CUDA `tf32` (train.tf32) says whether float32 products run on TF32 tensor cores."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, units = gpu_peak(name, dtype, tf32)
        return peak, f"{name}, {units}" if peak is not None else f"{name} (unknown peak: MFU not reported)"
    if device.type == "cpu":
        return cpu_peak_tflops(dtype), f"CPU measured {str(dtype).replace('torch.', '')} matmul ceiling"
    return None, f"{device.type} (unknown peak: MFU not reported)"
