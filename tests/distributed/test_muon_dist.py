"""Muon under every way Kiln splits a model (gloo, 2 processes): tensor-parallel splits, pipeline
stages, and experts split over ranks beside FSDP-sharded attention log the losses of one process
within 1e-5. Muon orthogonalises whole matrices (each expert's on its own): a sharded matrix is
gathered first, so a layout changes only the order of additions, never what is orthogonalised."""

from __future__ import annotations

import pytest
from dist_helpers import assert_close, base_overrides, train, write_corpus
from test_moe_dist import MOE

MUON = ["optim.name=muon", "model.tie_embeddings=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon-dist")
    return root, base_overrides(root / "cache", write_corpus(root)) + MUON


@pytest.fixture(scope="module")
def single(setup):
    root, base = setup
    return train(root / "runs", "single", base)


@pytest.mark.parametrize(
    "name, layout",
    [
        ("tp2", ["parallel.tp=2"]),
        ("pp2", ["parallel.pp=2", "parallel.pp_microbatches=4"]),
    ],
)
def test_muon_layouts_match_one_process(setup, single, name, layout):
    root, base = setup
    assert_close(train(root / "runs", name, base + layout, nproc=2), single)


def test_muon_with_experts_split_over_ranks_and_fsdp_matches_one_process(setup):
    """Expert parallelism inside 2 FSDP ranks: the experts split over the ranks, attention and the
    dense first layer sharded by FSDP. The reference trains on each rank's micro-batch (the
    auxiliary losses are per micro-batch)."""
    root, base = setup
    moe = [*MOE, "train.micro_batch_size=4"]
    one = train(root / "runs", "moe-single", base + moe)
    assert_close(train(root / "runs", "moe-ep2", base + moe + ["parallel.ep=2"], nproc=2), one)
