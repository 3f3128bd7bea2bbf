"""Fault injection (`[faults]`): each class leaves the signature it imitates in the run folder."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from kiln.runs.rundir import RunDir
from kiln.train.checkpoint import verify_checkpoint
from kiln.train.session import start_run

STEPS = 60


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    from kiln.config import load_config

    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root / "corpus")
    runs = root / "runs"

    def run(name, *faults, extra=()):
        cfg = load_config(
            overrides=tiny_overrides(
                corpus,
                root / "cache",
                f"train.steps={STEPS}",
                "checkpoint.every=20",
                "eval.every=20",
                'callbacks.enabled=["layer_stats", "step_time"]',
                "callbacks.layer_stats.every=5",
                "callbacks.layer_stats.heatmap=false",
                "optim.lr=3e-3",
                *extra,
                *faults,
            )
        )
        start_run(cfg, runs, name)
        return RunDir(runs / name)

    run.overrides = lambda *extra: tiny_overrides(corpus, root / "cache", *extra)
    run.runs = runs
    return run


def guard_events(run):
    return [(e["step"], e["kind"], e["action"]) for e in run.events() if e.get("action")]


def test_nonfinite_loss_and_gradient(train):
    assert guard_events(train("nan-loss", "faults.nonfinite_loss=[30]")) == [(30, "nonfinite", "skip")]
    assert guard_events(train("nan-grad", "faults.nonfinite_grad=[31]")) == [(31, "nonfinite", "skip")]


def test_corrupt_batch_is_a_loss_spike_the_guard_skips(train):
    run = train("corrupt", "faults.corrupt_batch=[40]")
    losses = {r["step"]: r["loss"] for r in run.metrics()}
    assert losses[40] > 1.25 * statistics.median(losses[s] for s in range(30, 40))
    assert (40, "loss_spike", "skip") in guard_events(run)


def test_learning_rate_faults_change_the_logged_rate(train):
    base = {r["step"]: r["lr"] for r in train("lr-base").metrics()}
    high = {
        r["step"]: r["lr"]
        for r in train("lr-high", "faults.lr_high=20", "faults.lr_high_factor=10", "guard.enabled=false").metrics()
    }
    low = {r["step"]: r["lr"] for r in train("lr-low", "faults.lr_low=20", "faults.lr_low_factor=0.001").metrics()}
    assert high[19] == base[19] and high[30] == pytest.approx(10 * base[30])
    assert low[30] == pytest.approx(0.001 * base[30])


def test_repeated_batch_is_memorised(train):
    losses = [r["loss"] for r in train("repeat", "faults.repeat_batch=10").metrics()]
    assert statistics.mean(losses[-5:]) < 0.5 * statistics.mean(losses[5:10])


def _layer(run, module, key, step):
    return next(
        r[key]
        for r in RunDir(run.path).read_jsonl(run.path / "layer_stats.jsonl")
        if r["module"] == module and r["step"] == step
    )


def test_entropy_collapse_and_dead_units_in_the_named_layer(train):
    run = train("collapse", "faults.entropy_collapse=30", "faults.layer=1")
    assert _layer(run, "layers.1.attn", "attn_entropy", 25) > 1.0
    assert _layer(run, "layers.1.attn", "attn_entropy", 40) < 0.2
    assert _layer(run, "layers.0.attn", "attn_entropy", 40) > 1.0
    run = train("dead", "faults.dead_units=30", "faults.layer=0", "faults.dead_fraction=0.5")
    assert _layer(run, "layers.0.mlp", "dead_frac", 25) == 0.0
    assert _layer(run, "layers.0.mlp", "dead_frac", 40) == pytest.approx(0.5, abs=0.02)
    assert _layer(run, "layers.1.mlp", "dead_frac", 40) < 0.05


def test_slow_steps_and_loader_stalls_show_in_the_step_records(train):
    records = {
        r["step"]: r
        for r in train(
            "slow", "faults.slow_steps=[30]", "faults.slow_s=0.5", "faults.loader_stall=[40]", "faults.stall_s=0.5"
        ).metrics()
    }
    typical = statistics.median(r["tokens_per_s"] for r in records.values())
    assert records[30]["tokens_per_s"] < 0.5 * typical and records[40]["tokens_per_s"] < 0.5 * typical
    assert records[40]["step_time/data_s"] >= 0.5 > records[30]["step_time/data_s"]


def test_corrupt_checkpoint_and_tokenizer_mismatch(train):
    from kiln.data.shards import prepare
    from kiln.data.tokenizer import load_tokenizer

    run = train("damaged", "faults.corrupt_checkpoint=40", "faults.tokenizer_mismatch=true")
    assert "checksum" in verify_checkpoint(run.checkpoints / "step-00000040")
    assert verify_checkpoint(run.checkpoints / "step-00000020") is None
    data = prepare(run.config().data, log=lambda _: None)
    assert load_tokenizer(run.tokenizer_path).sha256 != data.manifest["tokenizer_sha256"]


def test_a_hang_ends_the_process_through_the_watchdog(train, tmp_path):
    overrides = train.overrides(
        f"train.steps={STEPS}", "faults.hang=25", "faults.hang_s=120", "guard.hang_min_s=2", "guard.hang_factor=5"
    )
    cmd = [
        sys.executable,
        "-m",
        "kiln",
        "train",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "hung",
        *(a for o in overrides for a in ("--set", o)),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "KILN_QUIET": "1"}
    )
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert (tmp_path / "hung" / "hang-rank0.txt").is_file()
    assert max(r["step"] for r in RunDir(tmp_path / "hung").metrics()) == 24


def test_faults_are_off_by_default_and_checked(train):
    from kiln.config import load_config
    from kiln.errors import ConfigError
    from kiln.train.callbacks.faults import any_fault

    assert not any_fault(load_config("tiny").faults)
    with pytest.raises(ConfigError, match="faults.layer"):
        load_config("tiny", overrides=["faults.layer=7"])
    nan_run = train.runs / "nan-loss"
    if not (nan_run / "summary.json").is_file():  # made by the test above, unless it ran on another worker
        train("nan-loss", "faults.nonfinite_loss=[30]")
    assert not math.isnan(json.loads((nan_run / "summary.json").read_text())["val_loss"])
