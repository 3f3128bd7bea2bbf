"""Callbacks under torchrun (gloo): metrics recorded on every rank are reduced over ranks; every
data-parallel rank draws its own dropout seed; the pipeline path fires every event (the loss on
the last stage); asynchronous checkpoints are reported only once committed; and every layout
evaluates exactly the same validation windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import REL, base_overrides, run_kiln, sets, write_corpus

PROBE = str(Path(__file__).parents[1] / "plugins" / "probe.py")


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-callbacks")
    base = base_overrides(root / "cache", write_corpus(root)) + [
        "model.tie_embeddings=false",
        "eval.batches=100",
        "data.val_fraction=0.13",
        'callbacks.enabled=["probe"]',
    ]  # eval: every window
    probe_dir = root / "probe"

    def train(name: str, extra: list[str], nproc: int) -> Path:
        import os

        os.environ["KILN_PROBE_DIR"] = str(probe_dir)
        run_kiln(
            [
                "train",
                "--plugin",
                PROBE,
                "--preset",
                "tiny",
                "--runs-dir",
                str(root / "runs"),
                "--name",
                name,
                *sets(base + extra),
            ],
            nproc,
        )
        return root / "runs" / name

    out = {
        "single": train("single", [], 1),
        "fsdp-async": train("fsdp-async", ["parallel.async_checkpoint=true"], 2),
        "pp": train("pp", ["parallel.pp=2", "parallel.pp_microbatches=4"], 2),
    }
    return out, probe_dir


def test_metrics_are_reduced_over_ranks_and_seeds_differ(runs):
    paths, _ = runs
    for record in jsonl(paths["fsdp-async"] / "metrics.jsonl"):
        assert (
            record["probe/rank_mean"],
            record["probe/rank_max"],
            record["probe/rank_min"],
            record["probe/rank_sum"],
            record["probe/only_rank1"],
        ) == (0.5, 1.0, 0.0, 1.0, 7.0)
    first = jsonl(paths["fsdp-async"] / "metrics.jsonl")[0]
    assert first["probe/seed_min"] != first["probe/seed_max"]  # data-parallel ranks: own dropout streams
    pp_first = jsonl(paths["pp"] / "metrics.jsonl")[0]
    assert pp_first["probe/seed_min"] == pp_first["probe/seed_max"]  # one data-parallel rank: one stream


def test_pipeline_path_fires_every_event(runs):
    _, probe = runs
    first_stage, last_stage = jsonl(probe / "pp-rank0.jsonl"), jsonl(probe / "pp-rank1.jsonl")
    for events in (first_stage, last_stage):
        assert [e[1] for e in events if e[0] == "step_start"] == list(range(10))
        assert [e[1] for e in events if e[0] == "after_backward"] == list(range(10))
        assert [e[1] for e in events if e[0] == "step_end"] == list(range(1, 11))
    assert not [e for e in first_stage if e[0] == "loss"]
    assert [e[1] for e in last_stage if e[0] == "loss"] == [s for s in range(10) for _ in range(4)]  # micro-batches


def test_async_checkpoints_are_reported_once_committed(runs):
    _, probe = runs
    for rank in (0, 1):
        reported = [e for e in jsonl(probe / f"fsdp-async-rank{rank}.jsonl") if e[0] == "checkpoint"]
        assert reported == [["checkpoint", 5, True], ["checkpoint", 10, True]]


def test_every_layout_evaluates_the_same_windows(runs):
    paths, _ = runs
    ref = jsonl(paths["single"] / "eval.jsonl")
    windows = ref[0]["val_tokens"] // 32
    assert windows % 8 and windows % 4  # not whole batches of the layouts: the last share is padded
    for name in ("fsdp-async", "pp"):
        got = jsonl(paths[name] / "eval.jsonl")
        assert [e["val_tokens"] for e in got] == [e["val_tokens"] for e in ref]
        for e, r in zip(got, ref):
            assert abs(e["val_loss"] - r["val_loss"]) <= REL * r["val_loss"], name
