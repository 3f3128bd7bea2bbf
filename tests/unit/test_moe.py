"""The mixture-of-experts block: routing against a per-token reference, grouped products against
the loop, capacity dropping, the balancing losses and bias, counts, and config refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig, load_config
from kiln.errors import ConfigError
from kiln.model import moe
from kiln.model.moe import MoEFeedForward, finish_step, run_experts
from kiln.model.registry import fresh_model, get_spec, resolve_family


def block(**kw) -> MoEFeedForward:
    fields = dict(d_model=16, moe_experts=4, moe_top_k=2, moe_d_ff=24, moe_bias_rate=0.0, mlp="swiglu", bias=False)
    fields.update(kw)
    torch.manual_seed(0)
    m = MoEFeedForward(ModelConfig(**fields))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def reference(m: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Each token through its chosen experts one at a time, weighted by the gates."""
    flat = x.reshape(-1, x.shape[-1])
    _, _, chosen, gates = m.route(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(m.top_k):
            e = chosen[t, j]
            h = F.silu(flat[t] @ m.experts.w1[e]) * (flat[t] @ m.experts.w3[e])
            out[t] += gates[t, j] * (h @ m.experts.w2[e])
    if m.shared is not None:
        out = out + m.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize(
    "kw", [{}, {"moe_score": "sigmoid"}, {"moe_shared_experts": 1}, {"moe_top_k": 1}, {"moe_norm_topk": False}]
)
def test_dropless_block_equals_the_per_token_reference(kw):
    m = block(**kw).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(m(x), reference(m, x), rtol=1e-5, atol=1e-5)


def test_grouped_products_equal_the_loop_forward_and_backward(monkeypatch):
    x = torch.randn(11, 16)
    counts = torch.tensor([3, 0, 6, 2])
    w = [
        torch.randn(4, 16, 24, requires_grad=True),
        torch.randn(4, 16, 24, requires_grad=True),
        torch.randn(4, 24, 16, requires_grad=True),
    ]
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(moe, "grouped_matmul_available", lambda t, g=grouped: g)
        xs = x.clone().requires_grad_()
        y = run_experts(xs, counts, *w)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        results.append((y.detach(), xs.grad, [p.grad.clone() for p in w]))
        for p in w:
            p.grad = None
    (y1, gx1, gw1), (y2, gx2, gw2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    for a, b in zip(gw1, gw2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_capacity_keeps_the_first_tokens_of_each_expert_and_counts_the_dropped():
    m = block(moe_experts=2, moe_top_k=1, moe_capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 8, 16)
    x[0, :, 0] = 1.0  # all 8 tokens choose expert 0; capacity = 8 * 1 / 2 = 4
    out = m.train()(x)
    kept = reference(m, x)
    torch.testing.assert_close(m.eval()(x), kept, rtol=1e-5, atol=1e-5)  # evaluation routes dropless
    torch.testing.assert_close(out[0, :4], kept[0, :4], rtol=1e-5, atol=1e-5)
    assert torch.all(out[0, 4:] == 0)  # dropped tokens pass only through the residual
    stats = finish_step([nn.ModuleDict({"mlp": m})])
    assert stats["moe/mlp/dropped"].item() == pytest.approx(0.5)
    assert stats["moe/mlp/load_max_mean"].item() == pytest.approx(2.0)


def test_auxiliary_losses_reach_the_router_through_backward():
    for kw in ({"moe_aux_loss": 0.1}, {"moe_seq_aux_loss": 0.1}, {"moe_z_loss": 0.1}):
        m = block(**kw).train()
        x = torch.randn(2, 6, 16)
        m(x).sum().backward()
        with_aux = m.router.weight.grad.clone()
        m2 = block().train()
        m2(x).sum().backward()
        assert not torch.allclose(with_aux, m2.router.weight.grad), kw
        # the extra gradient is exactly the aux term's: d(coef * aux)/dW
        logits, scores, chosen, _ = m.route(x.reshape(-1, 16))
        expert_of = chosen.reshape(-1)
        aux = m._aux_loss(
            logits, scores / scores.sum(-1, keepdim=True), torch.bincount(expert_of, minlength=4), expert_of, 2, 6
        )
        grad = torch.autograd.grad(aux, m.router.weight)[0]
        torch.testing.assert_close(with_aux - m2.router.weight.grad, grad, rtol=1e-3, atol=1e-5)


def test_switch_loss_is_its_coefficient_when_routing_is_uniform():
    m = block(moe_aux_loss=0.5, moe_experts=4, moe_top_k=1)
    logits = torch.zeros(8, 4)
    scores = logits.softmax(-1)
    expert_of = torch.arange(8) % 4
    assert m._aux_loss(logits, scores, torch.bincount(expert_of, minlength=4), expert_of, 1, 8).item() == pytest.approx(
        0.5
    )


def test_the_balancing_bias_moves_towards_the_mean_load_and_not_on_a_discarded_step():
    m = block(moe_bias_rate=0.01)
    m.load.copy_(torch.tensor([10.0, 2.0, 2.0, 2.0]))
    m.tallies.copy_(torch.tensor([0.0, 1.0]))  # 16 assignments: 8 tokens
    finish_step([m], discard=torch.tensor(1.0))
    assert torch.all(m.expert_bias == 0) and torch.all(m.load == 0)
    m.load.copy_(torch.tensor([10.0, 2.0, 2.0, 2.0]))
    m.tallies.copy_(torch.tensor([0.0, 1.0]))  # 16 assignments: 8 tokens
    finish_step([m])
    torch.testing.assert_close(m.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    # the bias changes which experts are chosen, never the gates' values
    x = torch.randn(6, 16)
    _, scores, chosen, gates = m.route(x)
    g = scores.gather(-1, chosen)
    torch.testing.assert_close(gates, g / g.sum(-1, keepdim=True))


def test_bias_balancing_evens_out_a_skewed_router():
    m = block(moe_experts=8, moe_top_k=2, moe_bias_rate=0.002).train()
    torch.manual_seed(1)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.1)
        m.router.weight[0] += 0.2  # expert 0 favoured by every token (their mean is 0.5)
    x = torch.randn(4, 64, 16) + 0.5
    ratios = []
    for _ in range(200):
        m(x)  # a training forward (with autograd on: that is what the counts come from)
        ratios.append(finish_step([nn.ModuleDict({"mlp": m})])["moe/mlp/load_max_mean"].item())
    assert ratios[0] > 3 and max(ratios[150:]) < 1.3, ratios


def test_moe_counts_all_parameters_and_active_flops():
    cfg = load_config("moe-tiny")
    spec = resolve_family(cfg)
    model = fresh_model(cfg.model, 4096, 0)
    assert spec.params(cfg.model, 4096) == sum(p.numel() for p in model.parameters())
    dense = load_config("tiny")
    # 2 of 8 experts of hidden 192 = the dense 384: the same active FLOPs plus the routers'
    extra = 6.0 * cfg.model.n_layers * cfg.model.d_model * cfg.model.moe_experts
    assert spec.flops(cfg.model, 4096) == get_spec("decoder").flops(dense.model, 4096) + extra


def test_moe_layers_follow_every_and_first_dense():
    cfg = load_config("moe-tiny", overrides=["model.n_layers=6", "model.moe_every=2", "model.moe_first_dense=1"])
    model = fresh_model(cfg.model, 320, 0)
    kinds = [isinstance(model.layers[str(i)].mlp, MoEFeedForward) for i in range(6)]
    assert kinds == [False, True, False, True, False, True]
    assert get_spec("moe").params(cfg.model, 320) == sum(p.numel() for p in model.parameters())


def test_expert_init_is_depth_scaled_for_the_down_projection():
    cfg = load_config("moe-tiny", overrides=["model.n_layers=8"])
    model = fresh_model(cfg.model, 320, 0)
    w2, w1 = model.layers["3"].mlp.experts.w2, model.layers["3"].mlp.experts.w1
    assert w2.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.layers["3"].mlp.expert_bias == 0)


@pytest.mark.parametrize(
    "sets, says",
    [
        (["model.family=decoder", "model.moe_experts=8"], "needs model.family = 'moe'"),
        (["model.moe_top_k=9"], "moe_top_k = 9 must be between 1"),
        (["model.moe_experts=1"], "moe_experts >= 2"),
        (["model.moe_first_dense=2"], "leaves no MoE layer"),
        (["model.moe_score=relu"], "moe_score = 'relu' is not allowed"),
        (["model.mlp=gelu"], "SwiGLU experts"),
        (["model.moe_capacity_factor=0.2"], "would drop most tokens"),
        (["model.moe_bias_rate=-1"], "moe_bias_rate must be >= 0"),
        (["parallel.ep=3"], "parallel.ep = 3 must divide model.moe_experts = 8"),
        (["model.family=decoder", "model.moe_experts=0", "parallel.ep=2"], r"has none \(set parallel.ep = 1\)"),
    ],
)
def test_bad_moe_settings_are_refused_with_the_key(sets, says):
    with pytest.raises(ConfigError, match=says):
        resolve_family(load_config("moe-tiny", overrides=sets))


@pytest.mark.parametrize(
    "preset, vocab, total, active",
    [("mixtral-8x7b", 32000, 46.7e9, 12.9e9), ("deepseek-moe-16b", 102400, 16.4e9, 2.8e9)],
)
def test_published_shapes_have_their_published_parameter_counts(preset, vocab, total, active):
    """Mixtral 8x7B: 46.7B parameters, 12.9B active; DeepSeekMoE 16B: 16.4B, 2.8B active."""
    from kiln.model.moe_spec import active_matmul_params

    cfg = load_config(preset)
    spec = resolve_family(cfg)
    assert spec.params(cfg.model, vocab) == pytest.approx(total, rel=0.01)
    # active: the matrices a token multiplies with, plus its embedding row table counted once
    assert active_matmul_params(cfg.model, vocab) + cfg.model.d_model * vocab == pytest.approx(active, rel=0.02)
