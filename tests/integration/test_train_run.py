"""End to end: corpus -> prepare -> train -> evaluate -> run folder, through `start_run`."""

import json
import math
import tomllib

import pytest
from conftest import write_repetitive_corpus

from kiln.config import from_dict
from kiln.train.session import start_run

SUMMARY_KEYS = {
    "steps",
    "tokens",
    "train_loss",
    "val_loss",
    "val_ppl",
    "val_acc",
    "unigram_entropy",
    "tokens_per_s",
    "mfu",
}
METRIC_KEYS = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
EVAL_KEYS = {"val_loss", "val_ppl", "val_acc"}


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One ~100-step run on a repetitive corpus, shared by the assertions below."""
    from conftest import tiny_overrides

    from kiln.config import load_config

    root = tmp_path_factory.mktemp("train")
    corpus = write_repetitive_corpus(root / "corpus")
    cfg = load_config(
        preset="tiny",
        overrides=tiny_overrides(
            corpus,
            root / "cache",
            "train.steps=100",
            "train.batch_size=8",
            "optim.lr=3e-3",
            "schedule.warmup_steps=10",
            "eval.every=50",
            "checkpoint.every=50",
            "checkpoint.keep=0",
            "log.every=1",
            "log.plot=true",
            "eval.sample_tokens=8",
            'eval.prompts=["def ", "the "]',
        ),
    )
    summary = start_run(cfg, root / "runs", "demo")
    return cfg, summary, root / "runs" / "demo"


def test_loss_drops(trained):
    _, _, run = trained
    losses = [r["loss"] for r in jsonl(run / "metrics.jsonl")]
    assert len(losses) == 100
    assert losses[0] > 0.8 * math.log(320)  # starts near uniform over the vocabulary
    assert losses[-1] < 0.6 * losses[0]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_summary(trained):
    cfg, summary, run = trained
    on_disk = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert summary["run"] == str(run)
    assert on_disk["steps"] == 100
    assert on_disk["tokens"] == 100 * 8 * 32
    assert on_disk["val_loss"] < 0.5 * on_disk["unigram_entropy"]  # it learned far more than token frequencies
    assert on_disk["val_ppl"] == pytest.approx(math.exp(on_disk["val_loss"]))
    assert 0.0 < on_disk["val_acc"] <= 1.0
    assert on_disk["tokens_per_s"] > 0
    assert on_disk["mfu"] is None or 0 < on_disk["mfu"] < 1
    assert on_disk["train_loss"] == jsonl(run / "metrics.jsonl")[-1]["loss"]
    for k in SUMMARY_KEYS - {"mfu"}:
        assert summary[k] == on_disk[k], k


def test_metrics_records(trained):
    cfg, _, run = trained
    records = jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 101))
    for r in records:
        assert METRIC_KEYS <= set(r)
        assert r["tokens"] == r["step"] * 8 * 32
        assert math.isfinite(r["loss"]) and r["grad_norm"] >= 0 and r["lr"] > 0 and r["tokens_per_s"] > 0
    assert records[0]["lr"] == pytest.approx(3e-3 / 11)  # first warmup step
    assert records[10]["lr"] == pytest.approx(3e-3)
    assert records[-1]["lr"] == pytest.approx(3e-3 * cfg.schedule.min_lr_ratio)


def test_eval_records(trained):
    _, summary, run = trained
    evals = jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [50, 100]
    for e in evals:
        assert EVAL_KEYS <= set(e)
        assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_loss"] == summary["val_loss"]


def test_run_folder_contents(trained):
    cfg, _, run = trained
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (run / "samples.txt").read_text()
    assert "=== 'def '" in samples and "=== 'the '" in samples
    assert (run / "tokenizer.json").is_file()
    assert from_dict(tomllib.loads((run / "config.toml").read_text())) == cfg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000050", "step-00000100"]


def test_gradient_accumulation_matches_whole_batch(make_corpus, tiny_config, tmp_path):
    corpus = make_corpus()
    whole = tiny_config(corpus, "train.steps=3", "train.batch_size=4")
    micro = tiny_config(corpus, "train.steps=3", "train.batch_size=4", "train.micro_batch_size=1")
    start_run(whole, tmp_path / "runs", "whole")
    start_run(micro, tmp_path / "runs", "micro")
    a = jsonl(tmp_path / "runs" / "whole" / "metrics.jsonl")
    b = jsonl(tmp_path / "runs" / "micro" / "metrics.jsonl")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_bad_data_leaves_no_run_folder(tiny_config, tmp_path):
    from kiln.errors import KilnError

    cfg = tiny_config(tmp_path / "missing")
    with pytest.raises(KilnError, match="missing"):
        start_run(cfg, tmp_path / "runs", "x")
    assert not (tmp_path / "runs" / "x").exists()


def test_split_too_small_for_the_context(make_corpus, tiny_config, tmp_path):
    from kiln.errors import KilnError as DataError

    corpus = make_corpus(n_files=6, lines_per_file=1)
    cfg = tiny_config(corpus, "model.seq_len=256", "data.val_fraction=0.05")
    with pytest.raises(DataError, match="fewer than one window"):
        start_run(cfg, tmp_path / "runs", "x")
