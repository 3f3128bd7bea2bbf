import math

import pytest
import torch

from kiln.config import OptimConfig, ScheduleConfig, load_config
from kiln.model.registry import build_model
from kiln.train.optim import build_optimizer, lr_at, param_groups, set_lr

PEAK = 1e-3


def sched(name="cosine", warmup=10, min_ratio=0.1, decay=0.2):
    return ScheduleConfig(name=name, warmup_steps=warmup, min_lr_ratio=min_ratio, decay_fraction=decay)


def test_warmup_is_linear_and_starts_above_zero():
    s = sched(warmup=10)
    lrs = [lr_at(i, 100, PEAK, s) for i in range(10)]
    assert lrs[0] > 0
    assert lrs[0] == pytest.approx(PEAK / 11)
    diffs = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx(PEAK / 11) for d in diffs)
    assert lrs[-1] < PEAK
    assert lr_at(10, 100, PEAK, s) == pytest.approx(PEAK)  # peak right after warmup


def test_cosine_ends_at_min_lr_and_is_monotone():
    s = sched(warmup=10, min_ratio=0.1)
    lrs = [lr_at(i, 100, PEAK, s) for i in range(100)]
    assert lrs[-1] == pytest.approx(0.1 * PEAK)
    after = lrs[10:]
    assert all(b <= a for a, b in zip(after, after[1:]))
    mid = 10 + (100 - 10 - 1) / 2
    assert lr_at(int(mid), 100, PEAK, s) == pytest.approx(
        0.1 * PEAK + 0.9 * PEAK * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 89))
    )
    assert lr_at(500, 100, PEAK, s) == pytest.approx(0.1 * PEAK)  # past the end: stays at the floor


def test_cosine_to_zero():
    s = sched(warmup=0, min_ratio=0.0)
    assert lr_at(0, 50, PEAK, s) == pytest.approx(PEAK)
    assert lr_at(49, 50, PEAK, s) == pytest.approx(0.0, abs=1e-15)


def test_wsd_is_flat_then_decays():
    s = sched(name="wsd", warmup=10, min_ratio=0.0, decay=0.2)
    total = 110  # 100 steps after warmup, the last 20 decay
    lrs = [lr_at(i, total, PEAK, s) for i in range(total)]
    assert all(lr == PEAK for lr in lrs[10:90])
    decay = lrs[90:]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert decay[0] == pytest.approx(PEAK * (1 - 1 / 20))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-15)
    s2 = sched(name="wsd", warmup=0, min_ratio=0.25, decay=0.5)
    assert lr_at(39, 40, PEAK, s2) == pytest.approx(0.25 * PEAK)
    assert lr_at(19, 40, PEAK, s2) == PEAK


def test_constant():
    s = sched(name="constant", warmup=5)
    assert [lr_at(i, 50, PEAK, s) for i in (5, 20, 49)] == [PEAK] * 3
    assert lr_at(0, 50, PEAK, s) == pytest.approx(PEAK / 6)


def test_warmup_longer_than_the_run():
    s = sched(warmup=1000)
    lrs = [lr_at(i, 10, PEAK, s) for i in range(10)]
    assert all(0 < lr <= PEAK for lr in lrs)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))  # warmup is clamped to the run: still a ramp
    assert lr_at(0, 1, PEAK, s) > 0


def test_decay_and_no_decay_groups():
    cfg = load_config(
        overrides=[
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=4",
            "model.seq_len=32",
            "model.bias=true",
            "model.qk_norm=true",
            "model.pos=learned",
        ]
    ).model
    model = build_model(cfg, 300)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    ids_no_decay = {id(p) for p in no_decay["params"]}
    for name in ("layers.0.attn.wq.bias", "layers.0.attn_norm.weight", "norm.weight", "layers.1.attn.q_norm.weight"):
        assert id(named[name]) in ids_no_decay, name
    ids_decay = {id(p) for p in decay["params"]}
    for name in ("tok_emb.weight", "pos_emb.weight", "layers.0.mlp.w1.weight"):
        assert id(named[name]) in ids_decay, name


def test_frozen_parameters_are_left_out():
    lin = torch.nn.Linear(4, 4)
    lin.bias.requires_grad_(False)
    decay, no_decay = param_groups(lin, 0.1)
    assert len(decay["params"]) == 1 and no_decay["params"] == []


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "single"])
def test_build_optimizer_and_set_lr(impl):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(
        model, OptimConfig(lr=0.01, weight_decay=0.2, beta1=0.8, beta2=0.9, implementation=impl), torch.device("cpu")
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    set_lr(opt, 0.123)
    assert all(g["lr"] == 0.123 for g in opt.param_groups)
    model(torch.ones(2, 4)).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)
