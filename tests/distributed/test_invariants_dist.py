"""Runtime invariants under torchrun (gloo, 2 processes): clean replica (dp_replicate = 2), FSDP
and tensor-parallel runs pass every check; a replica whose parameters are perturbed (data-parallel
or tensor-parallel, the `Replicate`-placed norms) and a rank that reads another rank's data are
caught at the next check, on every rank, with one line each and an "invariant" event."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dist_helpers import base_overrides, run_kiln, sets, write_corpus

PLUGIN = str(Path(__file__).parents[1] / "plugins" / "perturb.py")
EVERY = 4
REPLICAS = ["parallel.dp_replicate=2", "parallel.dp_shard=1"]
TP = ["parallel.tp=2", "model.tie_embeddings=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-invariants")
    base = base_overrides(root / "cache", write_corpus(root)) + [
        "train.steps=8",
        "eval.every=0",
        "checkpoint.every=0",
        'callbacks.enabled=["invariants", "perturb"]',
        f"callbacks.invariants.every={EVERY}",
    ]
    return root, base


def train(setup, name: str, extra: list[str], perturb: str = ""):
    root, base = setup
    os.environ["KILN_PERTURB"] = perturb  # run_kiln passes the environment on to every rank
    try:
        proc = run_kiln(
            [
                "train",
                "--plugin",
                PLUGIN,
                "--preset",
                "tiny",
                "--runs-dir",
                str(root / "runs"),
                "--name",
                name,
                *sets(base + extra),
            ],
            nproc=2,
            check=not perturb,
        )
    finally:
        os.environ.pop("KILN_PERTURB")
    run = root / "runs" / name
    events = (
        [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        if (run / "events.jsonl").is_file()
        else []
    )
    return proc, run, [e for e in events if e["kind"] == "invariant"]


@pytest.mark.parametrize("layout", ["replicas", "fsdp", "tp"])
def test_clean_runs_pass(setup, layout):
    extra = {"replicas": REPLICAS, "fsdp": [], "tp": TP}[layout]
    _, run, violations = train(setup, f"clean-{layout}", extra)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["invariant_checks"] == 3  # steps 1, 4, 8
    assert not violations


def _caught(proc, violations, invariant: str, step: int, detail: str) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line from each rank, no hang
    expected = f"kiln: error: invariant '{invariant}' violated at step {step}: "
    assert all(e.startswith(expected) and detail in e for e in errors), errors
    assert "Traceback" not in proc.stderr.split("kiln: error:")[0]
    assert len(violations) == 1 and violations[0]["step"] == step and violations[0]["invariant"] == invariant
    assert violations[0]["ranks"] == [0, 1]


@pytest.mark.parametrize("layout, relation", [("replicas", "data-parallel replicas"), ("tp", "tensor-parallel ranks")])
def test_a_perturbed_replica_is_caught_at_the_next_check(setup, layout, relation):
    extra = REPLICAS if layout == "replicas" else TP
    proc, _, violations = train(setup, f"perturbed-{layout}", extra, perturb="params:2")
    first = "tok_emb.weight" if layout == "replicas" else "layers.0.attn_norm.weight"  # tp: Replicate-placed norms
    _caught(proc, violations, "replicas identical", EVERY, f"{first} differs between ranks 0 and 1 ({relation})")


def test_a_rank_reading_another_ranks_data_is_caught_at_once(setup):
    proc, _, violations = train(setup, "same-data", [], perturb="data")  # FSDP: dp_shard = 2
    _caught(proc, violations, "disjoint data", 1, "ranks 0 and 1 (data-parallel ranks 0 and 1) both read windows")
