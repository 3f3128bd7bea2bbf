import json

import pytest
import torch
from torch import nn

from kiln import hardware as flops_mod
from kiln.config import load_config
from kiln.hardware import gpu_peak_tflops, peak_tflops
from kiln.model.registry import build_model, padded_vocab
from kiln.model.transformer_spec import matmul_params, model_params
from kiln.scaling.flops import flops_per_token, param_count

BASE = ["model.n_layers=3", "model.d_model=64", "model.n_heads=4", "model.seq_len=32"]


def counted_matmul_params(model: nn.Module) -> int:
    """Weights of every Linear, plus the embedding when it doubles as the output projection."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if model.head is None:
        n += model.tok_emb.weight.numel()
    return n


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.tie_embeddings=true", "model.mlp=gelu", "model.pos=learned"],
        ["model.tie_embeddings=false", "model.mlp=gelu", "model.pos=learned", "model.bias=true"],
        ["model.tie_embeddings=true", "model.mlp=swiglu", "model.pos=rope", "model.n_kv_heads=2"],
        ["model.tie_embeddings=false", "model.mlp=swiglu", "model.d_ff=96", "model.n_kv_heads=1", "model.qk_norm=true"],
        ["model.mlp=gelu", "model.d_ff=200"],
    ],
)
def test_matmul_params_match_the_model(overrides):
    cfg = load_config(overrides=[*BASE, *overrides]).model
    vocab = padded_vocab(300)
    model = build_model(cfg, 300)
    assert matmul_params(cfg, vocab) == counted_matmul_params(model)
    L, d, T = cfg.n_layers, cfg.d_model, cfg.seq_len
    assert flops_per_token(cfg, vocab) == 6 * matmul_params(cfg, vocab) + 12 * L * d * T


def test_flops_per_token_by_hand():
    cfg = load_config(overrides=[*BASE, "model.mlp=gelu", "model.n_kv_heads=0"]).model
    # per layer: attention 4*d^2, MLP 8*d^2; plus the output projection d*V
    n = 3 * (4 * 64 * 64 + 8 * 64 * 64) + 64 * 320
    assert matmul_params(cfg, 320) == n
    assert flops_per_token(cfg, 320) == 6 * n + 12 * 3 * 64 * 32


def test_gpt2_124m_parameter_count():
    cfg = load_config(preset="gpt2-124m").model
    # 85M in the blocks plus the 50257 x 768 (tied) output projection
    assert matmul_params(cfg, 50257) == 12 * 12 * 768 * 768 + 768 * 50257


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
    ],
)
def test_gpu_peak_tflops(name, peak):
    assert gpu_peak_tflops(name) == peak


@pytest.mark.parametrize(
    "name, bf16, tf32, fp32",
    [  # the names torch.cuda.get_device_name reports
        ("NVIDIA H100 80GB HBM3", 989.0, 494.5, 67.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0, 378.0, 51.0),
        ("NVIDIA H100 NVL", 835.0, 417.5, 60.0),
        ("NVIDIA H200", 989.0, 494.5, 67.0),
        ("NVIDIA H200 NVL", 835.0, 417.5, 60.0),  # not the H200's
        ("NVIDIA A100-SXM4-80GB", 312.0, 156.0, 19.5),
        ("NVIDIA A100-PCIE-40GB", 312.0, 156.0, 19.5),
        ("NVIDIA L40S", 362.0, 183.0, 91.6),  # not the L40's, nor the L4's
        ("NVIDIA L40", 181.0, 90.5, 90.5),
        ("NVIDIA B200", 2250.0, 1100.0, 75.0),
        ("NVIDIA GB200", 2500.0, 1250.0, 80.0),  # not the B200's
    ],
)
def test_gpu_peaks_by_precision_and_tf32(name, bf16, tf32, fp32):
    assert flops_mod.gpu_peak(name, torch.bfloat16) == (bf16, "bf16 tensor cores")
    assert flops_mod.gpu_peak(name, torch.float32, tf32=True) == (tf32, "TF32 tensor cores")
    assert flops_mod.gpu_peak(name, torch.float32, tf32=False) == (fp32, "fp32 CUDA cores")


def test_float32_without_tf32_hardware_is_on_the_cuda_cores():
    assert flops_mod.gpu_peak("Tesla V100-SXM2-16GB", torch.float32, tf32=True) == (15.7, "fp32 CUDA cores")


def test_peak_on_cuda_names_the_card_and_the_units(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    cuda = torch.device("cuda", 0)
    assert peak_tflops(cuda, torch.bfloat16) == (756.0, "NVIDIA H100 PCIe, bf16 tensor cores")
    assert peak_tflops(cuda, torch.float32, tf32=False) == (51.0, "NVIDIA H100 PCIe, fp32 CUDA cores")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Unknown Accelerator")
    assert peak_tflops(cuda, torch.float32) == (None, "Some Unknown Accelerator (unknown peak: MFU not reported)")


@pytest.mark.parametrize("name", ["Some Unknown Accelerator", "", "NVIDIA GeForce GTX 1080"])
def test_unknown_gpu_has_no_peak(name):
    assert gpu_peak_tflops(name) is None


def test_peak_on_cpu_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    calls = []

    def fake_measure(dtype, n=1024, seconds=0.5):
        calls.append(dtype)
        return 0.25

    monkeypatch.setattr(flops_mod, "measure_cpu_matmul_tflops", fake_measure)
    peak, source = peak_tflops(torch.device("cpu"), torch.float32)
    assert peak == 0.25 and "CPU" in source
    assert peak_tflops(torch.device("cpu"), torch.float32)[0] == 0.25
    assert calls == [torch.float32]  # measured once, then read from the cache
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert list(cache.values()) == [0.25]


def test_a_ceiling_measured_on_a_busy_machine_is_raised_by_a_faster_run(tmp_path, monkeypatch):
    """A cached ceiling below what a run achieved (MFU > 100%) was measured under load: it is
    measured again and the highest figure kept."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    measured = iter([0.07, 0.15])
    monkeypatch.setattr(flops_mod, "measure_cpu_matmul_tflops", lambda dtype, **kw: next(measured))
    assert flops_mod.cpu_peak_tflops(torch.float32) == 0.07  # measured while busy
    assert flops_mod.raise_cpu_peak(torch.float32, achieved=0.09) == 0.15  # re-measured when idle
    assert flops_mod.cpu_peak_tflops(torch.float32) == 0.15  # and cached
    monkeypatch.setattr(flops_mod, "measure_cpu_matmul_tflops", lambda dtype, **kw: 0.05)
    assert flops_mod.raise_cpu_peak(torch.float32, achieved=0.2) == 0.2  # never below what was achieved


def test_real_cpu_measurement_is_positive(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    assert flops_mod.measure_cpu_matmul_tflops(torch.float32, n=128, seconds=0.05) > 0
    peak, _ = peak_tflops(torch.device("cpu"), torch.float32)
    assert peak > 0 and (tmp_path / "cpu_peak.json").is_file()


def test_unknown_device_type():
    assert peak_tflops(torch.device("meta"), torch.float32)[0] is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.tie_embeddings=true", "model.mlp=gelu", "model.pos=learned", "model.bias=true", "model.norm=layernorm"],
        ["model.tie_embeddings=false", "model.mlp=swiglu", "model.pos=rope", "model.bias=true", "model.n_kv_heads=2"],
        [
            "model.tie_embeddings=false",
            "model.mlp=swiglu",
            "model.pos=rope",
            "model.bias=false",
            "model.norm=rmsnorm",
            "model.qk_norm=true",
        ],
        ["model.pos=learned", "model.max_seq_len=64", "model.bias=false", "model.norm=layernorm", "model.d_ff=100"],
        ["model.post_norm=true", "model.norm=layernorm", "model.bias=true", "model.qk_norm=true"],
        ["model.post_norm=true", "model.norm=rmsnorm", "model.bias=false"],
    ],
)
def test_model_params_counts_every_parameter(overrides):
    cfg = load_config(overrides=[*BASE, *overrides]).model
    model = build_model(cfg, 300)
    assert model_params(cfg, 300) == sum(p.numel() for p in model.parameters())
    assert param_count(cfg, 300) == model_params(cfg, 300)  # through the family's spec
