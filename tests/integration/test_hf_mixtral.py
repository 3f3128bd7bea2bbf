"""The Mixtral-shaped `moe` model against `transformers`' MixtralForCausalLM: exported logits
and greedy generations match, import then export is bit-identical, a Mixtral that `transformers`
saved itself imports with parity, and options Mixtral cannot hold are refused in one line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import (  # noqa: E402  (after the importorskip, so a missing transformers skips)
    assert_greedy_agrees,
    batch,
    export_folder,
    hf_model,
    random_model,
    save_causal_tokenizer,  # noqa: E402,F401
    saved_transformers_model,
    tokenizer,  # noqa: F401  (a pytest fixture: the tests below take it by name)
)

from kiln.config import ModelConfig, load_config  # noqa: E402
from kiln.errors import ConfigError  # noqa: E402
from kiln.interop import hf_files  # noqa: E402
from kiln.interop.convert import LanguageModel, adapter_for, load, read_hf  # noqa: E402

MIXTRAL = ModelConfig(
    family="moe",
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_model=64,
    seq_len=32,
    pos="rope",
    rope_theta=50000.0,
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
    moe_experts=4,
    moe_top_k=2,
    moe_d_ff=72,
    moe_bias_rate=0.0,
    moe_aux_loss=0.02,
    moe_capacity_factor=1.0,
)  # capacity: training only, not at inference


def test_exported_mixtral_matches_transformers(tmp_path, tokenizer):
    model = random_model(MIXTRAL, tokenizer.vocab_size)
    folder = export_folder(model, MIXTRAL, tokenizer, tmp_path / "hf")
    theirs = hf_model(folder)
    assert type(theirs).__name__ == "MixtralForCausalLM"
    ids = batch(tokenizer)
    with torch.no_grad():
        ours = LanguageModel(model, tokenizer.vocab_size, MIXTRAL)(ids)
        diff = (ours - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-5, f"max |logit difference| {diff:.2e}"
    prompt = ids[:1, :4]
    with torch.no_grad():
        greedy = theirs.generate(
            prompt,
            max_new_tokens=20,
            do_sample=False,
            use_cache=False,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=None,
        )
    assert_greedy_agrees(LanguageModel(model, tokenizer.vocab_size, MIXTRAL), theirs, prompt, greedy, 1e-5)


def test_mixtral_import_then_export_is_bit_identical(tmp_path, tokenizer):
    adapter = adapter_for(MIXTRAL)
    folder = export_folder(random_model(MIXTRAL, tokenizer.vocab_size, seed=3), MIXTRAL, tokenizer, tmp_path / "a")
    original = hf_files.read_weights(folder)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in original  # the Hub's layout
    imported, tok, state = read_hf(folder)
    assert imported == replace(MIXTRAL, max_seq_len=MIXTRAL.seq_len, moe_capacity_factor=0.0)
    again = adapter.to_hf(
        imported, state | {f"layers.{i}.mlp.expert_bias": torch.zeros(4) for i in range(2)}, tok.vocab_size
    )
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_a_mixtral_saved_by_transformers_imports_with_parity(tmp_path, tokenizer):
    config = transformers.MixtralConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        sliding_window=None,
        eos_token_id=tokenizer.eos_id,
    )
    theirs = saved_transformers_model(transformers.MixtralForCausalLM, config, tmp_path / "mixtral")
    save_causal_tokenizer(tokenizer, tmp_path / "mixtral")
    model, tok = load(tmp_path / "mixtral")
    ids = batch(tok)
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_the_mixtral_preset_maps_to_mixtral_8x7b():
    cfg = load_config("mixtral-8x7b").model
    config = adapter_for(cfg).config(cfg, 32000, {"bos": 1, "eos": 2, "pad": None})
    assert (
        config["num_local_experts"],
        config["num_experts_per_tok"],
        config["intermediate_size"],
        config["hidden_size"],
        config["num_key_value_heads"],
        config["rope_theta"],
    ) == (8, 2, 14336, 4096, 8, 1e6)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"moe_score": "sigmoid"}, "moe_score = 'sigmoid'"),
        ({"moe_shared_experts": 1}, "moe_shared_experts = 1"),
        ({"moe_bias_rate": 1e-3}, "moe_bias_rate = 0.001"),
        ({"moe_first_dense": 1}, "moe_first_dense = 1"),
        ({"qk_norm": True}, "qk_norm"),
    ],
)
def test_what_mixtral_cannot_hold_is_refused(change, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        adapter_for(MIXTRAL).flavour(replace(MIXTRAL, **change))
