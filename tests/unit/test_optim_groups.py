"""Per-group optimizers (`[[optim.groups]]`, `optim.name = "muon"`): every parameter in exactly one
group, each group's kind, learning rate and weight decay, and refusals in one line."""

from __future__ import annotations

import pytest
import torch

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.model.registry import build_model
from kiln.train.optim import build_optimizer, set_lr
from kiln.train.optim_groups import assign, group_rules, parameter_kinds, torch_param_groups

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.seq_len=16"]


def model_and_cfg(preset: str = "tiny", *more: str):
    cfg = load_config(preset, overrides=[*SMALL, *more])
    return build_model(cfg.model, 320), cfg


def groups_toml(tmp_path, text: str):
    path = tmp_path / "groups.toml"
    path.write_text(text)
    return path


def test_kinds_of_a_decoder_a_mixture_of_experts_and_an_image_stem():
    untied, _ = model_and_cfg("tiny", "model.tie_embeddings=false", "model.pos=learned")
    kinds = parameter_kinds(untied)
    assert kinds["tok_emb.weight"] == kinds["pos_emb.weight"] == "embedding"
    assert kinds["head.weight"] == "head"
    assert kinds["layers.0.attn.wq.weight"] == kinds["layers.1.mlp.w2.weight"] == "hidden"
    assert kinds["layers.0.attn_norm.weight"] == kinds["norm.weight"] == "norm_bias"
    tied, _ = model_and_cfg("tiny")
    assert "head.weight" not in parameter_kinds(tied)  # a tied head is the embedding
    moe, _ = model_and_cfg("moe-tiny")
    moe_kinds = parameter_kinds(moe)
    assert moe_kinds["layers.1.mlp.experts.w1"] == "hidden"  # 3-D expert weights: Muon per expert
    vlm, _ = model_and_cfg("vlm-tiny")
    vlm_kinds = parameter_kinds(vlm)
    assert vlm_kinds["stem.weight"] == vlm_kinds["patch_pos.weight"] == "embedding"
    assert vlm_kinds["stem.bias"] == "norm_bias"


def test_plain_adamw_keeps_its_two_groups():
    model, cfg = model_and_cfg()
    assert group_rules(cfg.optim) == []
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert all("lr_mult" not in g for g in opt.param_groups)


def test_muon_by_name_splits_hidden_matrices_from_the_rest():
    model, cfg = model_and_cfg("tiny", "optim.name=muon", "model.tie_embeddings=false")
    rules = group_rules(cfg.optim)
    assigned = assign(rules, parameter_kinds(model))
    assert sorted(assigned) == ["embedding", "head", "hidden", "norm_bias"]
    assert all(".attn." in n or ".mlp." in n for n in assigned["hidden"])
    assert assigned["head"] == ["head.weight"] and assigned["embedding"] == ["tok_emb.weight"]
    groups = torch_param_groups(model, cfg.optim, rules)
    by = {g["group"]: g for g in groups}
    assert by["hidden"]["optimizer"] == "muon" and by["hidden"]["lr"] == cfg.optim.muon_lr
    assert by["hidden"]["lr_mult"] == pytest.approx(cfg.optim.muon_lr / cfg.optim.lr)
    assert by["norm_bias"]["weight_decay"] == 0.0 and by["embedding"]["weight_decay"] == cfg.optim.weight_decay
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))


def test_groups_from_a_table_with_globs_kinds_lr_and_betas(tmp_path):
    toml = groups_toml(
        tmp_path,
        """
[[optim.groups]]
name = "attention"
params = ["layers.*.attn.*"]
optimizer = "muon"
lr_mult = 0.5

[[optim.groups]]
name = "mlp"
params = ["layers.*.mlp.*"]
lr = 3e-3
betas = [0.8, 0.99]

[[optim.groups]]
name = "rest"
kind = "embedding"
weight_decay = 0.0

[[optim.groups]]
name = "norms"
kind = "norm_bias"
""",
    )
    cfg = load_config("tiny", toml, SMALL)
    model = build_model(cfg.model, 320)
    groups = {g["group"]: g for g in torch_param_groups(model, cfg.optim, group_rules(cfg.optim))}
    assert groups["attention"]["lr"] == pytest.approx(0.5 * cfg.optim.muon_lr)
    assert groups["mlp"]["lr"] == 3e-3 and groups["mlp"]["betas"] == (0.8, 0.99)
    assert groups["mlp"]["weight_decay"] == cfg.optim.weight_decay and groups["rest"]["weight_decay"] == 0.0
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    set_lr(opt, 0.5 * cfg.optim.lr)  # the schedule's value for optim.lr, halfway through a warmup
    lrs = {g["group"]: g["lr"] for g in opt.param_groups}
    assert lrs["mlp"] == pytest.approx(1.5e-3) and lrs["attention"] == pytest.approx(0.25 * cfg.optim.muon_lr)
    assert lrs["rest"] == pytest.approx(0.5 * cfg.optim.lr)


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            '[[optim.groups]]\nname = "a"\nkind = "hidden"\n',
            "no [[optim.groups]] table selects parameter tok_emb.weight",
        ),
        (
            '[[optim.groups]]\nname = "a"\nkind = "hidden"\n[[optim.groups]]\nname = "b"\nparams = ["layers.*"]\n'
            '[[optim.groups]]\nname = "c"\nkind = "embedding"\n[[optim.groups]]\nname = "d"\nkind = "norm_bias"\n',
            "parameter layers.0.attn_norm.weight is selected by optim.groups b and d",
        ),
        (
            '[[optim.groups]]\nname = "a"\nparams = ["*"]\noptimizer = "muon"\n',
            "gives Muon the 1-D tensor",
        ),
        (
            '[[optim.groups]]\nname = "a"\nparams = ["*"]\n[[optim.groups]]\nname = "b"\nparams = ["decoder.*"]\n',
            "optim.groups.b.params ['decoder.*'] matches no parameter",
        ),
    ],
)
def test_groups_that_do_not_cover_the_model_once_are_refused(tmp_path, text, needle):
    cfg = load_config("tiny", groups_toml(tmp_path, text), SMALL)
    model = build_model(cfg.model, 320)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        assign(group_rules(cfg.optim), parameter_kinds(model))


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[[optim.groups]]\nname = "a"\n', "needs exactly one of params"),
        ('[[optim.groups]]\nname = "a"\nkind = "hidden"\nparams = ["*"]\n', "needs exactly one of params"),
        ('[[optim.groups]]\nname = "a"\nkind = "weights"\n', "kind must be one of"),
        ('[[optim.groups]]\nname = "a"\nkind = "hidden"\noptimizer = "sgd"\n', "optimizer must be adamw or muon"),
        ('[[optim.groups]]\nname = "a b"\nkind = "hidden"\n', "name must be letters"),
        ('[[optim.groups]]\nname = "a"\nkind = "hidden"\n[[optim.groups]]\nname = "a"\nkind = "head"\n', "twice"),
        ('[[optim.groups]]\nname = "a"\nkind = "hidden"\nbetas = [0.9]\n', "betas must be"),
        ('[[optim.groups]]\nname = "a"\nkind = "hidden"\noptimizer = "muon"\nbetas = [0.9, 0.9]\n', "Muon takes"),
        ('[[optim.groups]]\nname = "a"\nkind = "hidden"\nmomentum = 0.9\n', "unknown key|optim.groups.a.momentum"),
        (
            '[optim]\nname = "adamw8bit"\n[[optim.groups]]\nname = "a"\nkind = "hidden"\noptimizer = "muon"\n',
            "low bits",
        ),
    ],
)
def test_bad_group_tables_get_one_line(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", groups_toml(tmp_path, text), SMALL)


def test_set_changes_a_named_group():
    cfg = load_config(
        "tiny",
        overrides=[*SMALL, "optim.name=muon", "optim.muon_adjust_lr=match_rms_adamw"],
    )
    assert group_rules(cfg.optim)[0].optimizer == "muon"
    with pytest.raises(ConfigError, match="optim.muon_adjust_lr"):
        load_config("tiny", overrides=["optim.muon_adjust_lr=other"])
