"""Low-bit AdamW states (torchao, an optional extra): less state memory, the loss of float32 states,
checkpoints that resume bit-exactly, a clear line where torchao is missing."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.model.registry import build_model, initialise
from kiln.train import lowbit
from kiln.train.optim import build_optimizer, set_lr
from kiln.train.session import resume_run, start_run

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name, most", [("adamw8bit", 0.30), ("adamw4bit", 0.20)])
def test_state_memory(name, most):
    """Both moments of the tiny preset's parameters: 8-bit states under 30% of float32's (the
    issue asks for >= 40% less), 4-bit under 20%."""
    sizes = {}
    for optim in ("adamw", name):
        cfg = load_config("tiny", overrides=[f"optim.name={optim}"])
        model = initialise(build_model(cfg.model, 512), cfg.model, 0)
        opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
        set_lr(opt, 1e-3)
        model(torch.randint(0, 512, (2, 16))).float().mean().backward()
        opt.step()
        sizes[optim] = lowbit.state_bytes([opt])
    assert sizes[name] <= most * sizes["adamw"], sizes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    root = tmp_path_factory.mktemp("lowbit")
    corpus = write_corpus(root / "corpus")

    def cfg(*extra):
        return load_config(preset="tiny", overrides=tiny_overrides(
            corpus, root / "cache", "train.steps=60", "eval.batches=4", "checkpoint.every=30", "checkpoint.keep=0",
            "schedule.warmup_steps=5", *extra))

    for optim in ("adamw", "adamw8bit", "adamw4bit"):
        start_run(cfg(f"optim.name={optim}"), root / "runs", optim)
    return root, cfg


# 4-bit states cost more at this size (4.3% here after 60 steps): checked, not promised to 1%
@pytest.mark.parametrize("name, rel", [("adamw8bit", 0.01), ("adamw4bit", 0.06)])
def test_low_bit_states_train_like_float32(runs, name, rel):
    root, _ = runs
    full = json.loads((root / "runs" / "adamw" / "summary.json").read_text())
    low = json.loads((root / "runs" / name / "summary.json").read_text())
    assert low["val_loss"] == pytest.approx(full["val_loss"], rel=rel)
    assert low["val_loss"] < jsonl(root / "runs" / name / "metrics.jsonl")[0]["loss"] - 1.0  # it did learn


def test_low_bit_resume_is_bit_identical(runs):
    root, cfg = runs
    from test_resume import Crash, CrashAt

    with pytest.raises(Crash):
        start_run(cfg("optim.name=adamw8bit"), root / "runs", "cut", callbacks=[CrashAt(40)])
    resume_run(root / "runs" / "cut")
    full, resumed = jsonl(root / "runs" / "adamw8bit" / "metrics.jsonl"), jsonl(root / "runs" / "cut" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 61))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]


def test_missing_torchao_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # what an absent package looks like to import
    cfg = load_config("tiny", overrides=["optim.name=adamw8bit"])
    model = build_model(cfg.model, 512)
    with pytest.raises(ConfigError, match=r"optim.name = 'adamw8bit' needs torchao .*pip install 'kiln\[kernels\]'"):
        build_optimizer(model, cfg.optim, torch.device("cpu"))
