"""The kernel registry: model and loss code call these ops; the backend decides what runs.

Each op has a PyTorch reference (kiln.kernels.reference) and a Triton version
(kiln.kernels.triton_ops, imported only when used). `kernels.backend` chooses, process-wide (as
torch.backends flags do): "torch" always runs the reference; "triton" runs Triton wherever it can
(CUDA, or the CPU under TRITON_INTERPRET=1, which is how the tests check the kernels); "auto" runs
Triton on CUDA tensors when Triton is installed and the reference elsewhere, and the reference
under torch.compile, where Inductor fuses it with its neighbours (until a GPU measurement says
otherwise: `make gpu-check` compares both). DTensor inputs (tensor
parallelism) always take the reference: DTensor has sharding rules for PyTorch ops, not for our
kernels.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import torch
from torch.distributed.tensor import DTensor

from kiln.errors import ConfigError
from kiln.kernels import reference

BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors, slowly: for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse, in one line, a backend this process cannot run on `device`."""
    if backend not in BACKENDS:
        raise ConfigError(f"kernels.backend = {backend!r} is not allowed; choose one of {', '.join(BACKENDS)}")
    if backend != "triton":
        return
    if not triton_installed():
        raise ConfigError(
            "kernels.backend = 'triton' needs Triton; install it (pip install 'kiln[kernels]') "
            "or set kernels.backend = 'auto'"
        )
    if device.type != "cuda" and not interpreting():
        raise ConfigError(
            f"kernels.backend = 'triton' runs on CUDA devices, not on {device.type} (except under "
            "TRITON_INTERPRET=1, for tests); set kernels.backend = 'auto' or 'torch'"
        )


def set_backend(backend: str) -> None:
    global _backend
    if backend not in BACKENDS:
        raise ConfigError(f"kernels.backend = {backend!r} is not allowed; choose one of {', '.join(BACKENDS)}")
    _backend = backend


def get_backend() -> str:
    return _backend


class use_backend:
    """`with use_backend("triton"): ...` — the backend for a block, restored after it."""

    def __init__(self, backend: str):
        self.backend, self.saved = backend, _backend

    def __enter__(self) -> None:
        self.saved = _backend
        set_backend(self.backend)

    def __exit__(self, *exc: object) -> None:
        set_backend(self.saved)


def _plain(*tensors: torch.Tensor) -> bool:
    return not any(isinstance(t, DTensor) for t in tensors)


def _triton() -> ModuleType:
    from kiln.kernels import triton_ops

    return triton_ops


def runs_triton(*tensors: torch.Tensor) -> bool:
    """Whether the ops on these tensors go to Triton under the current backend."""
    if _backend == "torch" or not _plain(*tensors):
        return False
    on_cuda = tensors[0].is_cuda
    if _backend == "triton":
        return on_cuda or interpreting()
    # "auto" under torch.compile: the reference ops, which Inductor fuses with their neighbours (a
    # Triton kernel is opaque to it). Which is faster on a GPU is for `make gpu-check` to measure.
    return on_cuda and triton_installed() and not torch.compiler.is_compiling()


def _pick(name: str, *tensors: torch.Tensor) -> Callable:
    return getattr(_triton() if runs_triton(*tensors) else reference, name)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _pick("rms_norm", x, weight)(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _pick("rope", x)(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _pick("swiglu", gate, up)(gate, up)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, summed log(Z)^2) of `hidden @ weight.T` against targets, a chunk of
    tokens at a time (kiln.kernels.cross_entropy); the per-row softmax work fused in Triton when
    the backend runs it."""
    from kiln.kernels.cross_entropy import chunked_linear_cross_entropy

    return chunked_linear_cross_entropy(hidden, weight, targets, chunk, fused=runs_triton(hidden, weight))
