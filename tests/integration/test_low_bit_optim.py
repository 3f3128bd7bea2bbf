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


@pytest.fixture(scope="module", autouse=True)
def traced_not_compiled():
    """torchao compiles its update per parameter shape: about a minute of inductor code generation
    on a fresh machine. Here the update is traced the same way but run by the "eager" backend,
    which costs seconds; inductor's path runs in bench/low_bit_optim.py and in `make test-dist`."""
    import functools

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield
    mp.undo()


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name, most", [("adamw8bit", 0.30), ("adamw4bit", 0.20)])
def test_state_memory(runs, name, most):
    """Both moments of the test model's parameters (the shapes the runs below compiled for):
    8-bit states under 30% of float32's (the issue asks for >= 40% less), 4-bit under 20%."""
    _, cfg_of = runs
    sizes = {}
    for optim in ("adamw", name):
        cfg = cfg_of(f"optim.name={optim}")
        model = initialise(build_model(cfg.model, 320), cfg.model, 0)
        opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
        set_lr(opt, 1e-3)
        model(torch.randint(0, 320, (2, 16))).float().mean().backward()
        opt.step()
        sizes[optim] = lowbit.state_bytes([opt])
    assert sizes[name] <= most * sizes["adamw"], sizes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    root = tmp_path_factory.mktemp("lowbit")
    corpus = write_corpus(root / "corpus")

    def cfg(*extra):
        return load_config(
            preset="tiny",
            overrides=tiny_overrides(
                corpus,
                root / "cache",
                "train.steps=40",
                "eval.batches=4",
                "checkpoint.every=20",
                "checkpoint.keep=0",
                "schedule.warmup_steps=5",
                *extra,
            ),
        )

    for optim in ("adamw", "adamw8bit", "adamw4bit"):
        start_run(cfg(f"optim.name={optim}"), root / "runs", optim)
    return root, cfg


# 4-bit states cost more at this size (4.3% after 60 steps of this model): checked, not promised to 1%
@pytest.mark.parametrize("name, rel", [("adamw8bit", 0.01), ("adamw4bit", 0.06)])
def test_low_bit_states_train_like_float32(runs, name, rel):
    root, _ = runs
    full = json.loads((root / "runs" / "adamw" / "summary.json").read_text())
    low = json.loads((root / "runs" / name / "summary.json").read_text())
    assert low["val_loss"] == pytest.approx(full["val_loss"], rel=rel)
    assert low["val_loss"] < jsonl(root / "runs" / name / "metrics.jsonl")[0]["loss"] - 1.0  # it did learn


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_low_bit_resume_is_bit_identical(runs, name):
    root, cfg = runs
    from test_resume import Crash, CrashAt

    with pytest.raises(Crash):
        start_run(cfg(f"optim.name={name}"), root / "runs", f"cut-{name}", callbacks=[CrashAt(30)])
    resume_run(root / "runs" / f"cut-{name}")
    full, resumed = (
        jsonl(root / "runs" / name / "metrics.jsonl"),
        jsonl(root / "runs" / f"cut-{name}" / "metrics.jsonl"),
    )
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]


def test_missing_torchao_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # what an absent package looks like to import
    cfg = load_config("tiny", overrides=["optim.name=adamw8bit"])
    model = build_model(cfg.model, 512)
    with pytest.raises(ConfigError, match=r"optim.name = 'adamw8bit' needs torchao .*pip install 'kiln\[kernels\]'"):
        build_optimizer(model, cfg.optim, torch.device("cpu"))


def test_a_checkpoint_names_only_known_state_classes(runs):
    """The class a quantised state names is looked up in a fixed list: a tampered file is refused."""
    import torch

    from kiln.errors import CheckpointError

    flat, meta = {}, {}
    lowbit.flatten_state("w/exp_avg", torch.zeros(3), flat, meta)  # a plain tensor: no metadata
    assert not meta and lowbit.unflatten_states(flat, meta)["w/exp_avg"].shape == (3,)
    bad = {"subclass:w/exp_avg": json.dumps({"class": "os.system", "names": [], "ctx": [], "size": [3], "stride": [1]})}
    with pytest.raises(CheckpointError, match="names an unexpected class 'os.system'"):
        lowbit.unflatten_states({}, bad)
