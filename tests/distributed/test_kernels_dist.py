"""torchao features under FSDP2 on two gloo ranks: float8 training with float8 all-gather (the
losses of one process, within the noise of per-rank activation scales), and 8-bit AdamW states
(DTensors of quantised shards) checkpointed through DCP and resumed at the same world size
bit-exactly, at another within the parity tolerance."""

from __future__ import annotations

import pytest
from conftest import avx2_on_avx512
from dist_helpers import assert_close, base_overrides, losses, run_kiln, train, write_corpus
from test_parallel import _cut_after

pytest.importorskip("torchao")


def test_fsdp_float8_matches_one_process(tmp_path):
    # Short and shallow: CPUs emulate float8 products (torch._scaled_mm took 56 ms for each of the
    # tiny model's products on an AVX-512 Xeon, 110 s for the 4-layer, 10-step version of this test);
    # on such a CPU both runs use the AVX2 kernels, where it takes ~0.1 ms (the same kernels for both).
    corpus = write_corpus(tmp_path)
    short = ["train.steps=4", "model.n_layers=2", "eval.every=0", "checkpoint.every=0", "kernels.float8=tensorwise"]
    base = base_overrides(tmp_path / "cache", corpus) + short  # the later --set wins
    env = avx2_on_avx512()
    one = train(tmp_path / "runs", "one", base, env=env)
    two = train(tmp_path / "runs", "two", base, nproc=2, env=env)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-3)  # each rank scales its own activations: not bit-equal


@pytest.mark.slow  # ~2 minutes of torch.compile in four processes; `make test-dist` runs it
def test_fsdp_low_bit_states_resume(tmp_path):
    corpus = write_corpus(tmp_path)
    base = base_overrides(tmp_path / "cache", corpus) + ["optim.name=adamw8bit"]
    full = train(tmp_path / "runs", "d2", base, nproc=2)
    same = _cut_after(tmp_path / "runs" / "d2", tmp_path / "runs" / "d2-again", 5)
    run_kiln(["train", "--resume", str(same)], nproc=2)
    assert losses(same) == full
    other = _cut_after(tmp_path / "runs" / "d2", tmp_path / "runs" / "d2-to-1", 5)
    run_kiln(["train", "--resume", str(other)])
    assert_close(losses(other), full)
