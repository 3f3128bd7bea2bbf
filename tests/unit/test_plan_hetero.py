"""`kiln plan` on mixed clusters: splits by speed, plans against their uniform twins, the `--set`
lines they emit, and the trainer-side settings those lines use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kiln.config import load_config
from kiln.data.loader import rank_share
from kiln.errors import ConfigError, DataError
from kiln.plan.cluster import BUILTIN, Cluster, Group
from kiln.plan.hetero import group_shares, hetero_plans, local_shares, split_by_speed
from kiln.plan.peak_memory import model_facts
from kiln.plan.search import HEADROOM
from kiln.train.build import rank_micro_batch


def test_splits_follow_speed():
    assert split_by_speed(16, [3.0, 1.0]) == [12, 4]
    assert split_by_speed(4, [1.0, 1.0, 1.0, 1.0]) == [1, 1, 1, 1]
    assert split_by_speed(3, [1.0, 1.0, 1.0, 1.0]) is None  # every stage needs a layer
    assert split_by_speed(16, [1.0, 1.0], fixed=[0.0, 4.0]) == [10, 6]  # the last stage's head: 4 blocks' worth
    assert group_shares(64, [2, 2], [3.0, 1.0], 1) == [24, 8]
    assert group_shares(64, [2, 2], [3.0, 1.0], 4) == [24, 8]
    assert group_shares(10, [4, 4], [1.0, 1.0], 1) is None  # 10 sequences cannot split into whole shares
    assert group_shares(16, [2, 3], [1.0, 1.0], 1) in ([2, 4], [5, 2])  # a split the greedy rule misses
    assert local_shares([1.0], [0.0], 8) == [8]
    assert local_shares([1.0, 2.0], [0.0, 0.0], 15) == [10, 5]
    assert local_shares([1.0, 1.0], [0.0, 0.0], 16) == [8, 8]


def mixed(a: str, b: str) -> Cluster:
    return Cluster((Group(BUILTIN[a], 8, 1), Group(BUILTIN[b], 8, 1)))


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b"])
def test_split_by_speed_beats_the_uniform_split(preset):
    cfg = load_config(preset=preset)
    f = model_facts(cfg, cfg.data.vocab_size, "bf16")
    plans = hetero_plans(f, mixed("h100", "a100"), cfg.global_batch, HEADROOM)
    assert plans and plans[0].tokens_per_s >= plans[-1].tokens_per_s
    best = plans[0]
    assert best.speedup > 1.5  # an H100 is ~3x an A100: the even split waits for the A100s
    times = [t.total for t in best.times]
    assert max(times) / min(times) < 1.25  # split by speed: the groups finish close together
    if best.shape == "data":
        assert sum(best.split) == cfg.global_batch and best.split[0] > best.split[-1]
    else:
        assert sum(best.split) == cfg.model.n_layers and best.split[0] > best.split[-1]
    for p in plans:  # every emitted plan is a config kiln train accepts
        load_config(preset=preset, overrides=p.sets())


def test_an_a10g_group_does_not_take_llama_1b_shares_it_cannot_hold():
    cfg = load_config(preset="llama-1b")
    f = model_facts(cfg, cfg.data.vocab_size, "bf16")
    for p in hetero_plans(f, mixed("a100", "a10g"), cfg.global_batch, HEADROOM):
        assert all(m.total <= 24e9 * HEADROOM for m in p.memory[1:])  # the A10G group's memory


def test_cli_plans_a_mixed_cluster(tmp_path):
    cluster = tmp_path / "mixed.toml"
    cluster.write_text('[[group]]\ndevice = "h100"\nper_node = 8\n\n[[group]]\ndevice = "a100"\nper_node = 8\n')
    out = tmp_path / "plans.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln",
            "plan",
            "--preset",
            "gpt2-124m",
            "--cluster",
            str(cluster),
            "--top",
            "2",
            "--explain",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    plans = json.loads(out.read_text())["plans"]
    assert plans[0]["tokens_per_s"] > plans[0]["uniform_tokens_per_s"]
    assert any(s.startswith(("parallel.dp_batch_shares=", "parallel.pp_layers=")) for s in plans[0]["set"])
    assert "the uniform split waits for the slowest group" in r.stdout


def test_shares_and_stage_layers_are_checked():
    with pytest.raises(ConfigError, match="add up to 10, not the global batch of 16"):
        load_config(preset="tiny", overrides=["parallel.dp_batch_shares=[6,4]"])
    with pytest.raises(ConfigError, match="parallel.pp = 1"):
        load_config(preset="tiny", overrides=["parallel.dp_batch_shares=[12,4]", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="names 3 stages; the pipeline has 2"):
        load_config(preset="tiny", overrides=["parallel.pp=2", "parallel.pp_layers=[1,1,0]"])
    with pytest.raises(ConfigError, match="add up to model.n_layers = 2"):
        load_config(preset="tiny", overrides=["parallel.pp=2", "parallel.pp_layers=[2,1]"])
    with pytest.raises(DataError, match="names 2 ranks; the run has 4"):
        rank_share(16, 0, 4, [12, 4])
    assert rank_share(16, 1, 2, [12, 4]) == (4, 12)
    cfg = load_config(preset="tiny", overrides=["parallel.dp_batch_shares=[12,4]", "train.micro_batch_size=6"])
    assert rank_micro_batch(cfg, 12) == 6 and rank_micro_batch(cfg, 4) == 2  # two passes on every rank
    odd = load_config(preset="tiny", overrides=["parallel.dp_batch_shares=[13,3]", "train.micro_batch_size=7"])
    with pytest.raises(ConfigError, match="must split into the 2 micro-batches"):
        rank_micro_batch(odd, 3)


def test_throttle_slows_both_passes_of_the_throttled_rank(monkeypatch):
    """`faults.throttle_rank` sleeps (factor - 1) x each leaf module's own time after its forward
    and after its backward (a slower device is slower in both, and FSDP pairs the ranks up in
    each pass); evaluation forwards and other ranks are not slowed."""
    from types import SimpleNamespace

    import torch

    from kiln.config import FaultsConfig
    from kiln.train.callbacks import faults

    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

    def attach(rank: int):
        callback = faults.Faults(FaultsConfig(throttle_rank=1, throttle_factor=3.0))
        trainer = SimpleNamespace(
            sampler=SimpleNamespace(batch=lambda i: None),
            par=SimpleNamespace(dp=(rank, 2)),
            module=SimpleNamespace(named_modules=model.named_modules, parts=[model]),
            is_main=rank == 0,
        )
        callback.on_run_start(trainer)
        return callback

    other = attach(0)
    model(torch.randn(4, 64)).sum().backward()
    assert slept == [] and other.hooks == []
    throttled = attach(1)
    model(torch.randn(4, 64, requires_grad=True)).sum().backward()  # as a block's input: it takes a gradient
    assert len(slept) == 5  # three forwards (two linears and the ReLU), two backwards (the linears)
    assert all(s >= 0 for s in slept)
    slept.clear()
    with torch.no_grad():
        model(torch.randn(4, 64))
    assert slept == []
    for h in throttled.hooks:
        h.remove()
