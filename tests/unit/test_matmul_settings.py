"""`apply_matmul_settings` (kiln.train.precision): train.tf32 and train.deterministic become the
process's TF32 flags, deterministic-algorithms mode, cuBLAS workspace and cuDNN autotuning. The CUDA
branch is exercised on any machine: the flags are process state that a CPU build also holds."""

from __future__ import annotations

import os

import pytest
import torch

from kiln.config import load_config
from kiln.train.precision import apply_matmul_settings

CUDA = torch.device("cuda", 0)  # a device object only: nothing is allocated on it


@pytest.fixture(autouse=True)
def restore_flags(monkeypatch):
    """The settings are process-wide: put them back (through the same legacy setters)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.backends.cudnn.benchmark = saved[2]
    torch.use_deterministic_algorithms(saved[3])


def cfg(*overrides: str):
    return load_config("tiny", overrides=list(overrides))


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_on_cuda_sets_both_the_legacy_and_the_per_backend_flags(tf32):
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    apply_matmul_settings(cfg(f"train.tf32={str(tf32).lower()}"), CUDA)
    mode = "tf32" if tf32 else "ieee"
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.fp32_precision == mode
    assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is tf32
    # every reader agrees: inductor reads the legacy getter, which raises on a mix of the two APIs
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_tf32_is_left_alone_on_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    apply_matmul_settings(cfg("train.tf32=true"), torch.device("cpu"))
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_deterministic_on_cuda(monkeypatch):
    torch.backends.cudnn.benchmark = True
    apply_matmul_settings(cfg("train.deterministic=true"), CUDA)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other reproducible setting is kept
    apply_matmul_settings(cfg("train.deterministic=true"), CUDA)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    apply_matmul_settings(cfg("train.deterministic=false"), CUDA)  # the config decides, both ways
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_on_the_cpu_touches_no_cuda_setting():
    torch.backends.cudnn.benchmark = True
    apply_matmul_settings(cfg("train.deterministic=true"), torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is True and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
