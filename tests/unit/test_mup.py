"""µP (`model.parametrization = "mup"`): at the base width the standard model; wider, hidden
matrices start smaller and learn slower under AdamW, logits are scaled by 1/m, attention by
sqrt(d0)/head_dim; the coordinate check (logits' change after a few AdamW steps stays flat with
width under µP, grows under the standard parametrisation); an export folds the multipliers."""

from __future__ import annotations

import pytest
import torch

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.model import mup
from kiln.model.registry import build_model, initialise
from kiln.train.optim import build_optimizer

BASE = 64
SMALL = ["model.n_layers=2", "model.n_heads=4", "model.seq_len=32", "model.tie_embeddings=false"]


def config(width: int, parametrization: str, *more: str):
    return load_config(
        "tiny",
        overrides=[
            *SMALL,
            f"model.d_model={width}",
            f"model.parametrization={parametrization}",
            f"model.mup_base_width={BASE}",
            *more,
        ],
    )


def logits_change(width: int, parametrization: str, steps: int = 4, lr: float = 1e-2) -> float:
    """RMS of the logits' change over `steps` AdamW steps on one fixed batch (the coordinate
    check of Yang et al.: under µP it does not grow with width)."""
    cfg = config(width, parametrization, f"optim.lr={lr}", "optim.weight_decay=0")
    model = build_model(cfg.model, 320)
    initialise(model, cfg.model, seed=0)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), width_mult=mup.width_mult(cfg.model))
    tokens = torch.randint(0, 320, (8, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens[:, :-1])
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return (model(tokens[:, :-1]) - before).pow(2).mean().sqrt().item()


def test_the_coordinate_check_is_flat_under_mup_and_grows_under_the_standard_parametrisation():
    """Widths 2x and 8x the base. (From 1x to 2x the µP curve still falls, by ~0.6x here: the
    initial readout's product with the features' change is a term that vanishes as width grows,
    as µP intends; at these widths the readout's own update, constant in width, dominates.)"""
    standard = logits_change(8 * BASE, "standard") / logits_change(2 * BASE, "standard")
    maximal = logits_change(8 * BASE, "mup") / logits_change(2 * BASE, "mup")
    assert standard > 2.5, standard  # AdamW moves every weight by ~lr: the readout's sum grows with width
    assert 0.75 < maximal < 1.33, maximal


def test_at_the_base_width_mup_is_the_standard_model():
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    outs = []
    for parametrization in ("standard", "mup"):
        cfg = config(BASE, parametrization)
        model = build_model(cfg.model, 320)
        initialise(model, cfg.model, seed=0)
        outs.append(model(tokens))
    assert torch.equal(outs[0], outs[1])


def test_wider_hidden_matrices_start_smaller_and_learn_slower():
    cfg = config(4 * BASE, "mup")
    assert mup.width_mult(cfg.model) == 4.0 and mup.output_mult(cfg.model) == 0.25
    assert mup.attention_scale(cfg.model) == pytest.approx((BASE // 4) ** 0.5 / (4 * BASE // 4))
    model = build_model(cfg.model, 320)
    initialise(model, cfg.model, seed=0)
    std = {n: p.std().item() for n, p in model.named_parameters() if p.dim() == 2}
    assert std["layers.0.attn.wq.weight"] == pytest.approx(cfg.model.init_std / 2, rel=0.05)
    assert std["tok_emb.weight"] == pytest.approx(cfg.model.init_std, rel=0.05)
    assert std["head.weight"] == pytest.approx(cfg.model.init_std, rel=0.05)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), width_mult=4.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["layers.0.mlp.w1.weight"])] == pytest.approx(cfg.optim.lr / 4)
    assert lr_of[id(named["tok_emb.weight"])] == lr_of[id(named["norm.weight"])] == pytest.approx(cfg.optim.lr)
    assert lr_of[id(named["head.weight"])] == pytest.approx(cfg.optim.lr)


def test_muon_groups_take_no_width_factor():
    cfg = config(4 * BASE, "mup", "optim.name=muon")
    model = build_model(cfg.model, 320)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), width_mult=4.0)
    by = {g["group"]: g["lr"] for g in opt.param_groups}
    assert by["hidden"] == pytest.approx(cfg.optim.muon_lr)  # its spectral shape scaling is µP's already


@pytest.mark.parametrize(
    "more, needle",
    [
        (["model.mup_base_width=0"], "mup_base_width"),
        (["model.mup_base_width=6"], "mup_base_width"),
        (["model.family=encoder", "train.objective=masked"], "parametrization"),
    ],
)
def test_bad_mup_configs_get_one_line(more, needle):
    with pytest.raises(ConfigError, match=needle):
        from kiln.train.resolve import check_model

        check_model(config(4 * BASE, "mup", *more))
