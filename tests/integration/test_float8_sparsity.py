"""FP8 training (torchao float8; emulated on the CPU, so checked for its numbers here, timed on a
GPU) and 2:4 sparsity (CUDA only: refused in one line elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.kernels.float8 import apply_float8, check_float8
from kiln.model.registry import build_model
from kiln.train.callbacks import Callback
from kiln.train.session import start_run

pytest.importorskip("torchao")
PLUGIN = Path(__file__).parents[1] / "plugins" / "layer_types.py"
pytestmark = pytest.mark.usefixtures("one_thread")


class LayerTypes(Callback):
    def __init__(self):
        super().__init__()
        self.types: dict[str, str] = {}

    def on_step_end(self, trainer, result):
        if not self.types:
            self.types = {n: type(m).__name__ for n, m in trainer.module.parts[0].named_modules()}


def summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    root = tmp_path_factory.mktemp("fp8")
    corpus = write_corpus(root / "corpus")

    # 12 steps: float8 against fp32 differs by ~1.7e-4 of the validation loss (tolerance 1e-2)
    def overrides(*extra):
        return tiny_overrides(corpus, root / "cache", "train.steps=12", *extra)

    def cfg(*extra):
        return load_config(preset="tiny", overrides=overrides(*extra))

    start_run(cfg(), root / "runs", "fp32")
    return root, cfg, overrides


def train_float8(root, overrides, recipe):
    """A float8 run in its own process: on an AVX-512 CPU under the AVX2 kernels, where
    torch._scaled_mm (the CPU's float8 emulation) is ~170x faster (BENCHMARKS.md, the suite);
    elsewhere under the CPU's own. Its layer types come back through the layer_types plugin."""
    from conftest import avx2_on_avx512

    sets = [a for s in overrides(f"kernels.float8={recipe}", 'callbacks.enabled=["layer_types"]') for a in ("--set", s)]
    argv = ["train", "--preset", "tiny", "--plugin", str(PLUGIN), "--runs-dir", str(root / "runs"), "--name", recipe]
    env = {**os.environ, **(avx2_on_avx512() or {}), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kiln", *argv, *sets], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(types=json.loads((root / "runs" / recipe / "layer_types.json").read_text()))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_trains_like_float32(baseline, recipe):
    root, _, overrides = baseline
    types = train_float8(root, overrides, recipe)
    assert types.types["layers.0.attn.wq"] == types.types["layers.1.mlp.w2"] == "Float8Linear"
    assert types.types["layers.0.attn_norm"] == "RMSNorm"
    full, f8 = summary(root / "runs" / "fp32"), summary(root / "runs" / recipe)
    assert f8["val_loss"] == pytest.approx(full["val_loss"], rel=0.01)
    assert f8["val_loss"] != full["val_loss"]  # float8 products did run


def test_float8_all_gather_wraps_the_weights():
    cfg = load_config("tiny")
    model = build_model(cfg.model, 512)
    assert apply_float8(model, "tensorwise", fsdp_all_gather=True) == cfg.model.n_layers * 7
    assert type(model.layers["0"].attn.wq.weight).__name__ == "WeightWithDynamicFloat8CastTensor"
    assert type(model.head.weight if model.head is not None else model.tok_emb.weight) is torch.nn.Parameter


def test_float8_refusals(monkeypatch):
    with pytest.raises(ConfigError, match="parallel.tp = 1"):
        check_float8("tensorwise", torch.device("cpu"), tp=2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    with pytest.raises(ConfigError, match=r"FP8 matrix units .* this one is 8.0"):
        check_float8("rowwise", torch.device("cuda", 0), tp=1)


def test_sparsity_refusals():
    from kiln.kernels.sparsity import check_sparsity

    with pytest.raises(ConfigError, match="needs train.precision = bf16"):
        check_sparsity("2:4", torch.device("cuda", 0), "fp32", "none")
    with pytest.raises(ConfigError, match="both replace the MLP's linear layers"):
        check_sparsity("2:4", torch.device("cuda", 0), "bf16", "rowwise")


def test_sparsity_is_refused_off_cuda(baseline, tmp_path):
    _, cfg, _ = baseline
    with pytest.raises(ConfigError, match="runs on CUDA GPUs only"):
        start_run(cfg("kernels.sparsity=2:4"), tmp_path / "runs", "sp")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln",
            "train",
            "--preset",
            "tiny",
            "--set",
            "kernels.sparsity=2:4",
            "--set",
            "train.device=cpu",
            "--runs-dir",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "cli").exists() or not any((tmp_path / "cli").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 sparse kernels need a GPU")
def test_sparsity_trains_on_a_gpu(baseline):
    root, cfg, _ = baseline
    types = LayerTypes()
    start_run(
        cfg("kernels.sparsity=2:4", "train.device=cuda", "train.precision=bf16", "model.d_model=128"),
        root / "runs",
        "sparse",
        callbacks=[types],
    )
    assert types.types["layers.0.mlp.w1"] == "SemiSparseLinear" and types.types["layers.0.attn.wq"] == "Linear"
