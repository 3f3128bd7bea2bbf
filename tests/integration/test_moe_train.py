"""Training the `moe` family for real: loss falls, routing statistics reach the metrics, gradient
accumulation gives the same steps as one big batch (auxiliary losses and capacity included), and
a killed run resumes with the same losses and the same balancing bias."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kiln.config import load_config
from kiln.train.session import resume_run, start_run

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = [
    "model.family=moe",
    "model.moe_experts=4",
    "model.moe_top_k=2",
    "model.moe_d_ff=64",
    "model.moe_aux_loss=0.01",
    "model.moe_z_loss=0.001",
    "model.moe_bias_rate=0.01",
]


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    root = tmp_path_factory.mktemp("moe")
    corpus = write_corpus(root / "corpus")

    def cfg(*extra):
        return load_config(
            preset="tiny",
            overrides=tiny_overrides(
                corpus,
                root / "cache",
                "train.steps=12",
                "checkpoint.every=6",
                "checkpoint.keep=0",
                "schedule.warmup_steps=3",
                "optim.lr=3e-3",
                *MOE,
                *extra,
            ),
        )

    start_run(cfg(), root / "runs", "full")
    return root, cfg


def test_moe_trains_and_records_routing_statistics(setup):
    root, _ = setup
    records = jsonl(root / "runs" / "full" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    for layer in ("layers.0", "layers.1"):
        ratios = [r[f"moe/{layer}/load_max_mean"] for r in records]
        assert all(1.0 <= x <= 4.0 for x in ratios)  # 4 experts: at most 4x the mean
        assert all(0 < r[f"moe/{layer}/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6 for r in records)
        assert all(r[f"moe/{layer}/dropped"] == 0 for r in records)  # dropless by default
    summary = json.loads((root / "runs" / "full" / "summary.json").read_text())
    assert summary["val_loss"] < 6.0


@pytest.mark.parametrize(
    "extra",
    [["model.moe_aux_loss=0"], ["model.moe_capacity_factor=1.25", "model.moe_seq_aux_loss=0.01"]],
    ids=["dropless", "capacity"],
)
def test_gradient_accumulation_matches_one_batch(setup, extra):
    """Two micro-batches of 2 give the step of one batch of 4 when routing is dropless and the
    auxiliary terms are per token (z-loss; the balancing bias moves on the whole step's counts).
    The Switch loss and capacity are per micro-batch (as in Megatron): close, not equal."""
    root, cfg = setup
    runs = root / "runs"
    base = ["train.steps=4", "checkpoint.every=0", *extra]
    name = "dropless" if len(extra) == 1 else "capacity"
    start_run(cfg(*base, "train.micro_batch_size=2"), runs, f"acc-{name}")
    start_run(cfg(*base, "train.micro_batch_size=4"), runs, f"one-{name}")
    acc, one = jsonl(runs / f"acc-{name}" / "metrics.jsonl"), jsonl(runs / f"one-{name}" / "metrics.jsonl")
    if "dropless" in name:  # dropless: the same gradient either way, so the same losses to rounding
        for a, b in zip(acc, one):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    else:  # capacity counts per micro-batch: a different (but valid) routing; the numbers are finite
        assert all(0 <= r["moe/layers.0/dropped"] < 0.5 for r in acc + one)


def test_resume_is_exact_with_the_balancing_bias(setup):
    root, cfg = setup
    runs = root / "runs"

    class Crash(Exception):
        pass

    from kiln.train.callbacks import Callback

    class CrashAt(Callback):
        order = 99

        def on_log(self, trainer, record):
            if record["step"] == 8:
                raise Crash("simulated kill")

    with pytest.raises(Crash):
        start_run(cfg(), runs, "cut", callbacks=[CrashAt()])
    resume_run(runs / "cut")
    full, resumed = jsonl(runs / "full" / "metrics.jsonl"), jsonl(runs / "cut" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed):
        assert a["loss"] == b["loss"] and a["moe/layers.1/load_max_mean"] == b["moe/layers.1/load_max_mean"]
    final = "checkpoints/step-00000012/model.safetensors"
    bias_full = load_file(runs / "full" / final)["layers.0.mlp.expert_bias"]
    bias_cut = load_file(runs / "cut" / final)["layers.0.mlp.expert_bias"]
    assert torch.equal(bias_full, bias_cut) and bias_full.abs().sum() > 0  # saved, restored and moving


def test_doctor_finds_a_collapsed_router_and_forks_with_balancing(setup, tmp_path):
    import shutil

    from kiln.runs.doctor import diagnose

    root, _ = setup
    assert not [f for f in diagnose(root / "runs" / "full") if f["kind"] == "router_collapse"]
    run = tmp_path / "collapsed"
    shutil.copytree(root / "runs" / "full", run)
    records = jsonl(run / "metrics.jsonl")
    for r in records:  # layer 1's busiest expert takes every token from step 5 (4 experts, top-2: 2x)
        if r["step"] >= 5:
            r["moe/layers.1/load_max_mean"] = 2.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (found,) = [f for f in diagnose(run) if f["kind"] == "router_collapse"]
    assert found["evidence"]["layer"] == "layers.1" and found["steps"] == [5, 12]
    argv = found["remedy"]["argv"]
    assert "--from-scratch" in argv  # the run's checkpoints (steps 6, 12) are after the collapse began
    assert "model.moe_bias_rate=0.02" in argv  # doubled from the run's 0.01
    from kiln.cli import main

    assert main([*argv, "--no-train"]) == 0  # a fork kiln accepts: balancing keys may change in a fork
