"""A step ready for a GPU: no host synchronisation inside a training step (`debug.count_syncs`
counts them on CPU, where they cost little, so that none reaches a GPU, where each idles the
device), and every model family and loss path compiles into one graph, backward included."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from kiln.config import load_config
from kiln.data.shards import prepare
from kiln.model.registry import fresh_model
from kiln.objectives import predicted_positions
from kiln.parallel.runtime import Parallel
from kiln.runs.rundir import RunDir
from kiln.syncs import SyncCounter
from kiln.train.build import build_trainer
from kiln.train.callbacks import Callback
from kiln.train.precision import resolve_device
from kiln.train.session import check_training, start_run


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("tiny", []),
        ("bert-tiny", []),
        ("moe-tiny", ["model.moe_capacity_factor=1.25"]),  # capacity dropping too
    ],
)
def test_no_host_sync_in_a_step(shared_corpus, tmp_path, preset, extra):
    overrides = tiny_overrides(shared_corpus, tmp_path / "cache", "debug.count_syncs=true", "log.every=2", *extra)
    start_run(load_config(preset=preset, overrides=overrides), tmp_path / "runs", "run")
    counts = [r["host_syncs"] for r in records(tmp_path / "runs" / "run")]
    assert counts == [0, 0], counts


class ReadsTheLoss(Callback):
    """A callback that reads the loss on the host inside the step: one sync a micro-batch."""

    def on_loss(self, trainer, step, loss):
        float(loss.detach())
        return loss


def test_a_planted_sync_is_counted_and_the_key_is_absent_when_off(shared_corpus, tmp_path):
    base = tiny_overrides(shared_corpus, tmp_path / "cache", "log.every=2", "train.micro_batch_size=2")
    start_run(load_config(preset="tiny", overrides=[*base, "debug.count_syncs=true"]), tmp_path, "on", [ReadsTheLoss()])
    assert [r["host_syncs"] for r in records(tmp_path / "on")] == [4, 4]  # 2 steps x 2 micro-batches
    start_run(load_config(preset="tiny", overrides=[*base, "train.steps=2"]), tmp_path, "off", [ReadsTheLoss()])
    assert all("host_syncs" not in r for r in records(tmp_path / "off"))


def test_the_counter_knows_each_kind_of_sync():
    counter = SyncCounter(torch.device("cpu"))
    x = torch.arange(6.0)
    with counter.counting():
        x.sum().item()
        x[x > 2]  # boolean indexing: the count decides the output's shape
        x.nonzero()
        torch.bincount(x.long())
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # sized: no sync
        x[torch.tensor([0, 1])]  # an integer index tensor: no sync
        torch.where(x > 2, x, 0)  # no sync
        torch.equal(x, x)  # a Python bool
        x[x > 4] = 0.0  # masked_fill_: no sync
        x[x > 4] = torch.tensor([1.0])  # one value: masked_fill_ too
    assert counter.take() == 6
    assert counter.take() == 0


def _trainer(tmp_path: Path, preset: str, *extra: str):
    cfg = load_config(preset=preset, overrides=tiny_overrides(tmp_path / "corpus", tmp_path / "cache", *extra))
    spec = check_training(cfg)
    par = Parallel.setup(cfg, resolve_device(cfg))
    return build_trainer(cfg, spec, RunDir(tmp_path / f"run-{time.monotonic_ns()}"), prepare(cfg.data, log=print), par)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("compile")
    write_corpus(root / "corpus")
    return root


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("tiny", []),
        ("tiny", ["kernels.cross_entropy=chunked", "train.z_loss=1e-4"]),
        ("bert-tiny", []),
        ("moe-tiny", ["model.moe_capacity_factor=1.25"]),
    ],
    ids=["decoder", "decoder-chunked-loss", "encoder-masked-head", "moe"],
)
def test_forward_and_loss_compile_whole(data_root, preset, extra):
    """fullgraph=True fails on the first graph break; aot_eager traces backward too, without
    Inductor's code generation."""
    trainer = _trainer(data_root, preset, *extra)
    module = trainer.module
    batch = module.objective.make_batch(trainer.sampler.batch(0), 0, 0)
    predict = predicted_positions(batch.targets) if module.predict_only else None
    compiled = torch.compile(module._forward_loss, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    loss, z = compiled(batch.inputs, batch.targets, batch.extras, predict)
    eager, _ = module._forward_loss(batch.inputs, batch.targets, batch.extras, predict)
    (loss + (z if z is not None else 0)).backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_the_image_text_family_compiles_whole():
    cfg = load_config(preset="vlm-tiny", overrides=["model.seq_len=32"]).model
    model = fresh_model(cfg, 512, seed=0)
    B, T = 2, 32
    tokens = torch.randint(0, 512, (B, T))
    patch_index = torch.where(torch.arange(T) < 16, torch.arange(T), -1).expand(B, T)
    patches = torch.randint(0, 256, (B, T, cfg.patch_size**2 * cfg.image_channels), dtype=torch.uint8)
    documents = torch.zeros(B, T, dtype=torch.long)

    def loss_of(tokens, patches, patch_index, documents):
        logits = model(tokens, patches=patches, patch_index=patch_index, documents=documents)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())

    torch._dynamo.reset()
    torch.compile(loss_of, backend="aot_eager", fullgraph=True)(tokens, patches, patch_index, documents).backward()


def test_the_masked_heads_positions_are_every_target_padded_with_ignored_ones():
    targets = torch.full((2, 100), -100)
    targets[0, [3, 50]] = 7
    targets[1, 99] = 8
    positions = predicted_positions(targets)
    assert positions.tolist()[:3] == [3, 50, 199] and len(positions) == 64
    assert (targets.flatten()[positions[3:]] == -100).all()
    assert len(predicted_positions(torch.zeros(2, 40, dtype=torch.long))) == 80  # all predicted: no padding left
