"""The image-text model under FSDP2 on two gloo ranks: a two-rank checkpoint resumed on one rank
continues with the two-rank run's losses."""

import json
import shutil

from dist_helpers import assert_close, losses, run_kiln, sets

STEPS = 10


def overrides(cache):
    return [
        f"data.cache_dir={cache}",
        "data.max_docs=600",
        "model.d_model=64",
        "model.seq_len=128",
        f"train.steps={STEPS}",
        "train.batch_size=8",
        "train.precision=fp32",
        "log.every=1",
        "eval.every=5",
        "checkpoint.every=5",
        "checkpoint.keep=0",
        "log.plot=false",
        "schedule.warmup_steps=2",
        "data.loader_workers=1",
        "eval.sample_tokens=2",
    ]


def train(root, name, nproc):
    run_kiln(
        [
            "train",
            "--preset",
            "vlm-tiny",
            "--runs-dir",
            str(root / "runs"),
            "--name",
            name,
            *sets(overrides(root / "cache")),
        ],
        nproc,
    )
    return losses(root / "runs" / name)


def test_save_two_ranks_resume_one(tmp_path):
    """The two-rank run, cut after its step-5 checkpoint and resumed on one rank, logs the
    two-rank run's losses: one process computes what two do, and continues the same stream."""
    two = train(tmp_path, "two", 2)
    run = tmp_path / "runs" / "two-to-one"
    shutil.copytree(tmp_path / "runs" / "two", run)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 5:
            shutil.rmtree(ckpt)
    run_kiln(["train", "--resume", str(run)])
    assert_close(losses(run), two)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["text_only_val_loss"] > evals[-1]["val_loss"]
