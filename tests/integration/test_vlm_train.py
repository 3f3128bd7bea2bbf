"""The image-caption demo trains for real: captions read the image, resume is exact, errors are one line."""

import json

import pytest
from test_resume import Crash, CrashAt

from kiln.cli import main
from kiln.config import load_config
from kiln.train.session import resume_run, start_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vlm")


def cfg(root, *extra):
    return load_config(
        preset="vlm-tiny",
        overrides=[f"data.cache_dir={root / 'cache'}", "log.plot=false", "log.every=1", "eval.sample_tokens=8", *extra],
    )


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(root):
    summary = start_run(cfg(root, "train.steps=70", "eval.every=35", "checkpoint.every=0"), root / "runs", "demo")
    return root / "runs" / "demo", summary


def test_captions_read_the_image(demo):
    run, summary = demo
    assert summary["val_loss"] < 0.5 * summary["text_only_val_loss"], summary
    assert summary["val_loss"] < 0.55
    samples = (run / "samples.txt").read_text()
    assert "(data: " in samples and summary["sample"]["reference"]


def test_resume_with_loader_workers_is_exact(root):
    base = ("train.steps=16", "checkpoint.every=8", "checkpoint.keep=0", "eval.every=8", "data.loader_workers=2")
    start_run(cfg(root, *base), root / "runs", "whole")
    with pytest.raises(Crash):
        start_run(cfg(root, *base), root / "runs", "cut", callbacks=[CrashAt(11)])
    resume_run(root / "runs" / "cut")
    assert losses(root / "runs" / "cut") == losses(root / "runs" / "whole")


def test_a_missing_source_is_one_line(root, capsys):
    argv = [
        "train",
        "--preset",
        "vlm-tiny",
        "--runs-dir",
        str(root / "runs"),
        "--set",
        f"data.corpus={root / 'missing.tar'}",
        "--set",
        f"data.cache_dir={root / 'cache'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.tar" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_kiln_eval_reads_the_images_too(demo):
    """`kiln eval` on the demo run: the trainer's validation loss, and the text-only one."""
    run, summary = demo
    assert main(["eval", str(run), "--suite", "lm", "memorisation"]) == 0  # a text-window suite is skipped, not fatal
    report = json.loads(sorted((run / "eval").glob("step-*.json"))[-1].read_text())
    lm = report["suites"]["lm"]
    assert "image-text" in report["skipped"]["memorisation"]
    assert abs(lm["loss"] - summary["val_loss"]) < 1e-4
    assert abs(lm["text_only_loss"] - summary["text_only_val_loss"]) < 1e-4


def test_a_frozen_encoder_run_resumes_and_evaluates_once_its_source_file_is_gone(root, demo):
    """The frozen stem's weights are in every checkpoint: once `model.image_encoder_from` is deleted,
    resume continues exactly (losses as a run that never lost it) and `kiln eval` still works;
    a fresh start from that config is refused in one line."""
    from kiln.runs.export import export_run

    source = root / "encoder.safetensors"
    export_run(demo[0], source)
    frozen = ("model.image_encoder=frozen", f"model.image_encoder_from={source}")
    base = ("train.steps=8", "checkpoint.every=4", "checkpoint.keep=0", "eval.every=4", *frozen)
    start_run(cfg(root, *base), root / "runs", "frozen-whole")
    with pytest.raises(Crash):
        start_run(cfg(root, *base), root / "runs", "frozen-cut", callbacks=[CrashAt(6)])
    source.unlink()
    resume_run(root / "runs" / "frozen-cut")
    assert losses(root / "runs" / "frozen-cut") == losses(root / "runs" / "frozen-whole")
    assert main(["eval", str(root / "runs" / "frozen-cut"), "--suite", "lm"]) == 0
    with pytest.raises(Exception, match="image_encoder_from = .* does not exist"):
        start_run(cfg(root, *base), root / "runs", "frozen-fresh")
    assert not (root / "runs" / "frozen-fresh").exists()
