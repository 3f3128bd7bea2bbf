import math

import pytest
import torch
from conftest import init_model

from kiln.config import load_config
from kiln.model.layers import RMSNorm, apply_rope, rope_tables, swiglu_hidden
from kiln.model.registry import build_model, padded_vocab

VOCAB = 300
BASE = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=32"]


def model_cfg(*overrides: str):
    return load_config(overrides=[*BASE, *overrides]).model


def make(*overrides: str, seed: int = 0):
    cfg = model_cfg(*overrides)
    return init_model(build_model(cfg, VOCAB), cfg, seed), cfg


VARIANTS = {
    "gpt2": ["model.pos=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true"],
    "llama": ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"],
    "gqa": ["model.pos=rope", "model.n_kv_heads=2"],
    "mqa": ["model.pos=rope", "model.n_kv_heads=1"],
    "qk_norm": ["model.qk_norm=true", "model.pos=rope"],
    "post_norm": ["model.post_norm=true", "model.norm=rmsnorm"],
    "untied": ["model.tie_embeddings=false"],
    "learned_long_table": ["model.pos=learned", "model.max_seq_len=64"],
    "mixed": ["model.pos=learned", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_heads=2"],
}


def test_padded_vocab():
    assert padded_vocab(300) == 320 and padded_vocab(320) == 320 and padded_vocab(321) == 384


@pytest.mark.parametrize("name", VARIANTS)
def test_output_shape_and_backward(name):
    model, cfg = make(*VARIANTS[name])
    tokens = torch.randint(0, VOCAB, (3, 32))
    logits = model(tokens)
    assert logits.shape == (3, 32, padded_vocab(VOCAB)) == (3, 32, 320)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # shorter sequences work too
    assert model(tokens[:, :5]).shape == (3, 5, 320)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
    model, _ = make(*VARIANTS[name])
    model.eval()
    tokens = torch.randint(0, VOCAB, (2, 32))
    t = 17
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t], atol=1e-4)  # the position itself (and later) do change


def test_module_structure_follows_options():
    gpt2, cfg = make(*VARIANTS["gpt2"])
    block = gpt2.layers["0"]
    assert isinstance(block.attn_norm, torch.nn.LayerNorm) and block.attn.wq.bias is not None
    assert block.mlp.w1.weight.shape == (4 * 64, 64)
    assert gpt2.pos_emb.weight.shape == (32, 64) and gpt2.rope_cos is None

    llama, _ = make(*VARIANTS["llama"])
    block = llama.layers["0"]
    assert isinstance(block.attn_norm, RMSNorm) and block.attn.wq.bias is None
    assert llama.pos_emb is None and llama.rope_cos.shape == (32, 8)  # (T, head_dim / 2)
    assert block.mlp.w1.weight.shape == block.mlp.w3.weight.shape == (swiglu_hidden(64), 64) == (192, 64)

    gqa, _ = make(*VARIANTS["gqa"])
    attn = gqa.layers["1"].attn
    assert attn.wq.weight.shape == (64, 64)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (2 * 16, 64)

    qk, _ = make(*VARIANTS["qk_norm"])
    assert qk.layers["0"].attn.q_norm.weight.shape == (16,)

    long_table, _ = make(*VARIANTS["learned_long_table"])
    assert long_table.pos_emb.weight.shape == (64, 64)

    assert len(gpt2.layers) == 2


def test_gqa_matches_repeated_kv_heads():
    """GQA with 2 kv heads equals multi-head attention whose k/v projections repeat each kv head."""
    gqa, cfg = make("model.pos=rope", "model.n_kv_heads=2", "model.n_layers=1")
    mha, _ = make("model.pos=rope", "model.n_layers=1")
    sd = gqa.state_dict()
    full = {}
    for k, v in sd.items():
        if ".attn.wk." in k or ".attn.wv." in k:
            rest = v.shape[1:]
            v = v.view(2, 16, *rest).repeat_interleave(2, dim=0).reshape(64, *rest)
        full[k] = v
    mha.load_state_dict(full)
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.allclose(gqa(tokens), mha(tokens), atol=1e-5)


def test_qk_norm_changes_the_function():
    plain, _ = make("model.pos=rope", seed=1)
    normed, _ = make("model.pos=rope", "model.qk_norm=true", seed=1)
    tokens = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(plain(tokens), normed(tokens), atol=1e-4)


def test_post_norm_adds_a_gain_per_sub_layer_and_changes_the_function():
    plain, _ = make(seed=1)
    sandwich, _ = make("model.post_norm=true", seed=1)
    added = set(sandwich.state_dict()) - set(plain.state_dict())
    assert added and all(".attn_post_norm." in k or ".mlp_post_norm." in k for k in added)
    assert all(torch.equal(sandwich.state_dict()[k], plain.state_dict()[k]) for k in plain.state_dict())
    tokens = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(plain(tokens), sandwich(tokens), atol=1e-4)


def test_z_loss_is_log_z_squared_over_predicted_positions():
    from kiln.objectives import IGNORE, z_loss_sum

    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, IGNORE, 2], [0, 4, IGNORE]])
    expected = sum(torch.logsumexp(logits[b, t], -1) ** 2 for b, t in [(0, 0), (0, 2), (1, 0), (1, 1)])
    assert torch.allclose(z_loss_sum(logits, targets), expected)


def test_dropout_is_active_only_in_training():
    model, _ = make("model.dropout=0.3")
    tokens = torch.randint(0, VOCAB, (2, 16))
    model.train()
    torch.manual_seed(0)
    a = model(tokens)
    b = model(tokens)
    assert not torch.allclose(a, b)
    torch.manual_seed(0)
    assert torch.equal(model(tokens), a)  # dropout draws from torch's global generator
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))
    no_drop, _ = make("model.dropout=0.0")
    no_drop.train()
    assert torch.equal(no_drop(tokens), no_drop(tokens))


def test_tied_embedding_is_the_output_weight():
    model, _ = make("model.tie_embeddings=true")
    assert model.head is None
    assert model.output_weight() is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and not any(n.startswith("head") for n in names)
    # the logits are the final hidden state times e(x)^T
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        model.tok_emb.weight[7].zero_()
        assert torch.all(model(tokens)[..., 7] == 0)

    untied, _ = make("model.tie_embeddings=false")
    assert untied.output_weight() is untied.head.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_params() == model.num_params() + 320 * 64


def test_num_params_excluding_embeddings():
    model, _ = make(*VARIANTS["gpt2"])
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(exclude_embeddings=True) == total - 320 * 64 - 32 * 64


def test_init_stds():
    cfg = model_cfg(
        "model.d_model=256",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.bias=true",
        "model.pos=learned",
        "model.tie_embeddings=false",
        "model.norm=layernorm",
        "model.mlp=gelu",
    )
    model = init_model(build_model(cfg, VOCAB), cfg)
    std = cfg.init_std
    residual = std / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(std, rel=0.05), name
            assert abs(p.mean().item()) < std / 10, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # norm gains
            assert torch.all(p == 1), name


def test_init_on_meta_then_to_empty():
    cfg = model_cfg("model.pos=rope", "model.qk_norm=true")
    with torch.device("meta"):
        meta = build_model(cfg, VOCAB)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    init_model(meta, cfg, seed=5)
    ref = init_model(build_model(cfg, VOCAB), cfg, seed=5)
    for n, p in meta.named_parameters():
        assert torch.isfinite(p).all(), n
    cos, sin = rope_tables(16, 32, cfg.rope_theta)
    assert torch.equal(meta.rope_cos, cos) and torch.equal(meta.rope_sin, sin)
    tokens = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        out = meta(tokens)
    assert torch.isfinite(out).all()
    try:
        import kiln.model.init  # noqa: F401  (seeded, layout-independent init)
    except ImportError:
        return
    for (n, p), (_, q) in zip(meta.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        assert torch.equal(out, ref(tokens))


def test_seeded_init_is_deterministic():
    pytest.importorskip("kiln.model.init")
    a, _ = make(seed=3)
    b, _ = make(seed=3)
    c, _ = make(seed=4)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
        if p.dim() == 2:
            assert not torch.equal(p, r), n


def test_rope_tables_and_relative_positions():
    cos, sin = rope_tables(8, 16, 10000.0)
    assert cos.shape == sin.shape == (16, 4)
    assert torch.allclose(cos[0], torch.ones(4)) and torch.allclose(sin[0], torch.zeros(4))
    assert sin[3, 0].item() == pytest.approx(math.sin(3.0))  # first frequency is 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 8, generator=g).expand(1, 1, 16, 8)
    k = torch.randn(1, 1, 1, 8, generator=g).expand(1, 1, 16, 8)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # rotation keeps length
    dots = rq[0, 0] @ rk[0, 0].T
    # the score depends only on the offset between positions
    assert dots[5, 2].item() == pytest.approx(dots[9, 6].item(), abs=1e-5)
    assert dots[3, 3].item() == pytest.approx(dots[11, 11].item(), abs=1e-5)
    assert dots[5, 2].item() != pytest.approx(dots[5, 3].item(), abs=1e-5)
