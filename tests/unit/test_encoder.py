"""The BERT-style encoder: bidirectional attention, padding masks, the tied MLM head, sizes, and
filling masks."""

import pytest
import torch

from kiln.config import load_config
from kiln.data.tokenizer import MASK, train_tokenizer
from kiln.errors import KilnError
from kiln.eval.fill import fill_prompt
from kiln.model.encoder import Encoder
from kiln.model.registry import build_model, padded_vocab
from kiln.model.transformer_spec import matmul_params, model_params
from kiln.scaling.flops import flops_per_token

VOCAB = 300
FLAVOURS = {
    "bert": [],
    "llama-ish": ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false", "model.n_kv_heads=2"],
    "untied": ["model.tie_embeddings=false", "model.qk_norm=true"],
}


def encoder_cfg(*extra):
    return load_config(
        overrides=[
            "model.family=encoder",
            "train.objective=masked",
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=4",
            "model.seq_len=32",
            *extra,
        ]
    )


def encoder(*extra, seed=0):
    torch.manual_seed(seed)
    return build_model(encoder_cfg(*extra).model, VOCAB).eval()


def test_the_registry_builds_an_encoder():
    model = encoder()
    assert isinstance(model, Encoder) and not model.causal
    assert not any(layer.attn.causal for layer in model.layers.values())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_attention_is_bidirectional(flavour):
    model = encoder(*FLAVOURS[flavour])
    x = torch.randint(5, VOCAB, (2, 32))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % VOCAB  # change only the last token
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 32, padded_vocab(VOCAB))
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-6)  # the first position sees the last


def test_a_decoder_of_the_same_shape_is_not():
    cfg = load_config(overrides=["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=32"])
    model = build_model(cfg.model, VOCAB).eval()
    x = torch.randint(5, VOCAB, (1, 32))
    y = x.clone()
    y[:, -1] += 1
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :-1], model(y)[:, :-1], atol=1e-6)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_padding_mask_hides_padded_positions(flavour):
    model = encoder(*FLAVOURS[flavour])
    lengths = [11, 32, 1]
    x = torch.randint(5, VOCAB, (3, 32))
    real = torch.arange(32)[None] < torch.tensor(lengths)[:, None]  # (B, T), True at real tokens
    garbage = torch.where(real, x, torch.randint(5, VOCAB, (3, 32)))
    with torch.no_grad():
        padded = model(x, padding_mask=real)
        other_padding = model(garbage, padding_mask=real)
        for row, n in enumerate(lengths):
            alone = model(x[row : row + 1, :n])[0]
            assert torch.allclose(padded[row, :n], alone, atol=1e-5)  # as if the padding were not there
            assert torch.allclose(other_padding[row, :n], padded[row, :n], atol=1e-5)
        assert torch.isfinite(padded).all()
        unmasked = model(garbage)
    assert not torch.allclose(unmasked[0, :11], padded[0, :11], atol=1e-5)  # without the mask, padding leaks in


def test_mlm_head_is_tied_to_the_input_embedding():
    model = encoder()
    assert model.output_weight() is model.tok_emb.weight
    assert model.mlm_head.bias.shape == (padded_vocab(VOCAB),)
    names = {n for n, _ in model.named_parameters()}
    assert {"mlm_head.dense.weight", "mlm_head.norm.weight", "mlm_head.bias"} <= names
    assert not any(n.startswith("head.") for n in names)
    untied = encoder("model.tie_embeddings=false")
    assert untied.output_weight() is untied.head.weight


def test_gradients_reach_every_parameter():
    model = encoder().train()
    x = torch.randint(5, VOCAB, (2, 32))
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_parameter_count_from_the_config_matches_the_model(flavour):
    cfg = encoder_cfg(*FLAVOURS[flavour])
    with torch.device("meta"):
        model = build_model(cfg.model, VOCAB)
    assert model.num_params() == model_params(cfg.model, VOCAB)


def test_flops_count_the_mlm_head():
    enc, dec = (
        encoder_cfg().model,
        load_config(overrides=["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=32"]).model,
    )
    assert matmul_params(enc, VOCAB) == matmul_params(dec, VOCAB) + 64 * 64
    assert flops_per_token(enc, VOCAB) == flops_per_token(dec, VOCAB) + 6 * 64 * 64


def test_bert_presets_have_their_shapes():
    base = load_config("bert-base")
    with torch.device("meta"):
        model = build_model(base.model, base.data.vocab_size)
    n = model.num_params()
    print(f"bert-base: {n / 1e6:.1f}M parameters")
    assert 105e6 < n < 115e6  # BERT-base: 110M
    assert (base.model.n_layers, base.model.d_model, base.model.n_heads, base.model.seq_len) == (12, 768, 12, 512)
    tiny = load_config("bert-tiny")
    assert tiny.model.family == "encoder" and tiny.data.corpus == "stdlib"


def test_fill_prompt_fills_only_the_masks():
    tok = train_tokenizer(iter(["def add(a, b):\n    return a + b\n"] * 20), vocab_size=300)
    model = build_model(encoder_cfg().model, tok.vocab_size).eval()
    out = fill_prompt(model, tok, f"def {MASK}(a, b):", 32, torch.device("cpu"))
    assert out.startswith("def [") and out.endswith("](a, b):")
    with pytest.raises(KilnError, match="put <\\|mask\\|> in the prompt"):
        fill_prompt(model, tok, "def add(a, b):", 32, torch.device("cpu"))
    with pytest.raises(KilnError, match="longer than the model's context"):
        fill_prompt(model, tok, MASK + " x" * 40, 32, torch.device("cpu"))
