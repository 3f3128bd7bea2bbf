"""The image-text model under FSDP2 on two gloo ranks: the same losses as one process, and a
two-rank checkpoint resumed on one rank continues the same data stream."""

import json
import shutil

import pytest

from dist_helpers import assert_close, losses, run_kiln, sets

STEPS = 10


def overrides(cache):
    return [f"data.cache_dir={cache}", "data.max_docs=600", "model.d_model=64", "model.seq_len=128",
            f"train.steps={STEPS}", "train.batch_size=8", "train.precision=fp32", "log.every=1", "eval.every=5",
            "checkpoint.every=5", "checkpoint.keep=0", "log.plot=false", "schedule.warmup_steps=2",
            "data.loader_workers=1"]


def train(root, name, nproc):
    run_kiln(["train", "--preset", "vlm-tiny", "--runs-dir", str(root / "runs"), "--name", name,
              *sets(overrides(root / "cache"))], nproc)
    return losses(root / "runs" / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-dist")
    return root, train(root, "one", 1), train(root, "two", 2)


def test_two_ranks_match_one(runs):
    _, one, two = runs
    assert_close(two, one)


def test_save_two_ranks_resume_one(runs):
    root, one, _ = runs
    run = root / "runs" / "two-to-one"
    shutil.copytree(root / "runs" / "two", run)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 5:
            shutil.rmtree(ckpt)
    run_kiln(["train", "--resume", str(run)])
    assert_close(losses(run), one)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["text_only_val_loss"] > evals[-1]["val_loss"]
