"""The `moe` family under data and pipeline parallelism (gloo, 2 processes): the same losses and
routing statistics as one process. The single-process reference uses the micro-batch each rank
sees, because the Switch loss is computed per micro-batch; the balancing bias moves on the
whole step's counts, summed over data-parallel ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import assert_close, base_overrides, train, write_corpus

MOE = [
    "model.family=moe",
    "model.moe_experts=4",
    "model.moe_top_k=2",
    "model.moe_d_ff=64",
    "model.mlp=swiglu",
    "model.bias=false",
    "model.moe_aux_loss=0.01",
    "model.moe_z_loss=0.001",
    "model.moe_bias_rate=0.01",
    "model.tie_embeddings=false",
    "model.moe_first_dense=1",
]


def routing(run: Path, key: str = "moe/layers.3/load_max_mean") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-dist")
    return root, base_overrides(root / "cache", write_corpus(root)) + MOE


@pytest.fixture(scope="module")
def single_micro4(setup):
    root, base = setup
    return train(root / "runs", "single-micro4", base + ["train.micro_batch_size=4"])


def test_moe_fsdp_matches_single_process(setup, single_micro4):
    root, base = setup
    runs = root / "runs"
    single = single_micro4
    assert_close(train(runs, "fsdp2", base, nproc=2), single)
    for layer in ("layers.1", "layers.2", "layers.3"):
        key = f"moe/{layer}/load_max_mean"
        assert routing(runs / "fsdp2", key) == routing(runs / "single-micro4", key)


def test_moe_tensor_parallel_matches_single_process(setup, single_micro4):
    """Tensor parallelism splits attention; the MoE blocks run whole on both tp ranks (the same
    tokens, the same experts), so even routing is bit-identical."""
    root, base = setup
    runs = root / "runs"
    single = single_micro4
    tp = train(runs, "tp2", base + ["parallel.tp=2", "train.micro_batch_size=4"], nproc=2)
    assert_close(tp, single)
    key = "moe/layers.3/load_max_mean"
    assert routing(runs / "tp2", key) == routing(runs / "single-micro4", key)


def test_moe_pipeline_matches_single_process(setup):
    """Step 1 is bit-identical: loss, gradient norm, the first stage's expert loads. Known gap: on
    later stages torch.distributed.pipelining's shape-inference forward (first step only) adds
    one micro-batch to the routing counts, so step 1's statistics and balancing-bias step there
    differ; and top-k routing is discontinuous, so a token at a near-tie can then pick another
    expert, which moves a later step's loss by ~1e-5. Later steps are held to 1e-3."""
    root, base = setup
    runs = root / "runs"
    single = train(runs, "single-micro2", base + ["train.micro_batch_size=2"])
    piped = train(runs, "pp2", base + ["parallel.pp=2", "parallel.pp_microbatches=4"], nproc=2)
    first = [
        json.loads(line)
        for line in ((runs / name / "metrics.jsonl").read_text().splitlines()[0] for name in ("pp2", "single-micro2"))
    ]
    for key in ("loss", "grad_norm", "moe/layers.1/load_max_mean"):
        assert first[0][key] == first[1][key], key
    assert first[0]["moe/layers.1/entropy"] == pytest.approx(first[1]["moe/layers.1/entropy"], rel=1e-5)
    assert all(abs(a - b) <= 1e-3 * b for a, b in zip(piped, single)), (piped, single)
