"""`kernels.cross_entropy = "chunked"` in real training: the losses (and z-loss) of the naive head,
for the decoder and the mixture-of-experts family; refused in one line where it cannot apply."""

from __future__ import annotations

import json

import pytest

from kiln.errors import ConfigError
from kiln.train.session import start_run

pytestmark = pytest.mark.usefixtures("one_thread")


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra", [[], ["model.family=moe", "model.moe_experts=4", "model.moe_d_ff=64"]], ids=["decoder", "moe"]
)
def test_chunked_loss_trains_like_the_naive_head(tiny_config, shared_corpus, tmp_path, extra):
    runs = tmp_path / "runs"
    common = ["train.steps=5", "train.z_loss=1e-3", "model.tie_embeddings=false", *extra]
    start_run(tiny_config(shared_corpus, *common), runs, "naive")
    start_run(
        tiny_config(shared_corpus, *common, "kernels.cross_entropy=chunked", "kernels.chunk_size=7"), runs, "chunked"
    )
    naive, chunked = records(runs / "naive"), records(runs / "chunked")
    assert len(naive) == len(chunked) == 5
    for a, b in zip(naive, chunked):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["z_loss"] == pytest.approx(a["z_loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_chunked_loss_is_refused_where_it_cannot_apply(tiny_config, shared_corpus, tmp_path):
    cfg = tiny_config(
        shared_corpus,
        "model.family=encoder",
        "train.objective=masked",
        "model.norm_position=post",
        "kernels.cross_entropy=chunked",
    )
    with pytest.raises(ConfigError, match="takes no loss head"):
        start_run(cfg, tmp_path / "runs", "enc")
