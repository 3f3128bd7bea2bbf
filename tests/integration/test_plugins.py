"""One plugin file (tests/plugins/everything.py) registers a corpus, a model family, a suite and a
callback; all of them work from `--plugin`, and a run trained with them resumes exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kiln import plugins
from kiln.cli import main

PLUGIN = str(Path(__file__).parents[1] / "plugins" / "everything.py")


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_TEST_CORPUS", str(tmp_path / "corpus"))
    sets = [
        "--set",
        "data.corpus=counting",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "data.vocab_size=300",
        "--set",
        "model.family=conv",
        "--set",
        "model.d_model=32",
        "--set",
        "model.seq_len=32",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.precision=fp32",
        "--set",
        "log.every=1",
        "--set",
        "eval.every=0",
        "--set",
        "eval.batches=1",
        "--set",
        "eval.sample_tokens=4",
        "--set",
        "log.plot=false",
        "--set",
        "schedule.warmup_steps=2",
        "--set",
        "schedule.name=constant",
        "--set",
        "model.dropout=0.1",
        "--set",
        'callbacks.enabled=["count_steps", "layer_stats"]',
        "--set",
        "callbacks.layer_stats.every=3",
        "--set",
        'eval.suites=["vocab-size"]',
        "--set",
        "guard.hang_min_s=0",
    ]
    yield tmp_path, sets
    plugins._loaded.pop(PLUGIN, None)
    # what the plugin registered goes with it: a later test in this worker (the evaluation suites
    # run every registered suite) must not meet it
    from kiln.data.corpora import CORPORA
    from kiln.eval.suites import SUITES
    from kiln.model.registry import MODEL_SPECS
    from kiln.train.callbacks.registry import CALLBACKS

    for name, module in list(sys.modules.items()):  # so that the next --plugin runs the file again
        if name.startswith("kiln_plugin_") and getattr(module, "__file__", None) == str(Path(PLUGIN).resolve()):
            del sys.modules[name]
    CORPORA.pop("counting", None)
    SUITES.pop("vocab-size", None)
    MODEL_SPECS.pop("conv", None)
    CALLBACKS.pop("count_steps", None)


def test_a_plugin_family_trains_checkpoints_and_resumes(env, capsys):
    tmp, sets = env
    runs = tmp / "runs"
    base = ["train", "--plugin", PLUGIN, "--runs-dir", str(runs), *sets]
    assert main(base + ["--name", "full", "--set", "train.steps=8", "--set", "checkpoint.every=4"]) == 0
    full = jsonl(runs / "full" / "metrics.jsonl")
    assert [r["plugin/count"] for r in full] == list(range(1, 9))  # the plugin's metric, every step
    assert full[-1]["loss"] < full[0]["loss"]
    assert {r["module"] for r in jsonl(runs / "full" / "layer_stats.jsonl")} == {"conv"}  # the spec's monitor modules
    assert json.loads((runs / "full" / "summary.json").read_text())["vocab-size/vocab"] == 300
    assert json.loads((runs / "full" / "run.json").read_text())["plugins"] == [PLUGIN]

    # the same run cut after its step-4 checkpoint, then resumed: the same losses, the same count
    assert main(base + ["--name", "cut", "--set", "train.steps=4", "--set", "checkpoint.every=4"]) == 0
    assert main(["train", "--plugin", PLUGIN, "--resume", str(runs / "cut"), "--set", "train.steps=8"]) == 0
    cut = jsonl(runs / "cut" / "metrics.jsonl")
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]
    assert [r["plugin/count"] for r in cut] == list(range(1, 9))  # callback state came back from the checkpoint

    capsys.readouterr()
    assert main(["eval", str(runs / "full"), "--plugin", PLUGIN, "--suite", "vocab-size", "lm"]) == 0
    assert "vocab" in capsys.readouterr().out
    assert main(["sample", str(runs / "full"), "--plugin", PLUGIN, "--prompt", "3 plus", "--max-tokens", "3"]) == 0


def test_without_the_plugin_the_error_names_it(env, capsys):
    tmp, sets = env
    runs = tmp / "runs"
    assert (
        main(["train", "--plugin", PLUGIN, "--runs-dir", str(runs), "--name", "r", *sets, "--set", "train.steps=2"])
        == 0
    )
    plugins._loaded.pop(PLUGIN, None)
    import kiln.model.registry as registry

    saved = registry.MODEL_SPECS.pop("conv")
    try:
        capsys.readouterr()
        assert main(["export", str(runs / "r"), "--out", str(tmp / "m.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'conv' is not a registered model family" in err and f"--plugin {PLUGIN}" in err
    finally:
        registry.MODEL_SPECS["conv"] = saved
    # export needs only the family: the run's user suite and callback, unregistered, do not matter there
    from kiln.eval.suites import SUITES
    from kiln.train.callbacks.registry import CALLBACKS

    suite, callback = SUITES.pop("vocab-size"), CALLBACKS.pop("count_steps")
    try:
        assert main(["export", str(runs / "r"), "--out", str(tmp / "m.safetensors")]) == 0
    finally:
        SUITES["vocab-size"], CALLBACKS["count_steps"] = suite, callback
