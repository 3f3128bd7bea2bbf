"""The Hugging Face mapping of Kiln's encoder: `BertForMaskedLM`, exactly or refused.

Kiln's `bert` flavour of the encoder is BERT's architecture (verified against the `transformers`
source, modeling_bert): post-norm blocks, norm(x + attn(x)) then norm(x + ffn(x)); summed word,
learned position and token-type embeddings (type 0) under a LayerNorm; the exact (erf) GELU in
the FFN and in the MLM head's transform (dense, GELU, LayerNorm); the decoder tied to the word
embeddings, with a per-token bias. BERT's pooler and next-sentence head are not part of
`BertForMaskedLM`. The pre-norm rotary encoder (`bert-tiny`) has no exact class and is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.interop.hf import HFAdapter

CLASS = "BertForMaskedLM"
BERT_OPTIONS = (
    "model.norm_position = 'post', model.embed_norm = true, model.type_vocab_size = 2, "
    "model.pos = 'learned', model.norm = 'layernorm', model.mlp = 'gelu_exact', model.bias = true "
    "(the bert flavour, as in the bert-base preset)"
)


def bert_flavour(cfg: ModelConfig) -> str:
    if cfg.family != "encoder":
        raise ConfigError(f"model.family = '{cfg.family}' is not an encoder")
    checks = (
        (cfg.norm_position == "post", f"model.norm_position = '{cfg.norm_position}'"),
        (cfg.pos == "learned", f"model.pos = '{cfg.pos}'"),
        (cfg.norm == "layernorm", f"model.norm = '{cfg.norm}'"),
        (cfg.mlp == "gelu_exact", f"model.mlp = '{cfg.mlp}'"),
        (cfg.embed_norm, "model.embed_norm = false"),
        (cfg.type_vocab_size >= 1, "model.type_vocab_size = 0"),
        (cfg.bias, "model.bias = false"),
        (cfg.tie_embeddings, "model.tie_embeddings = false"),
        (not cfg.qk_norm, "model.qk_norm = true"),
        (not cfg.post_norm, "model.post_norm = true"),
        (cfg.kv_heads == cfg.n_heads, f"model.n_kv_heads = {cfg.n_kv_heads}"),
    )
    for ok, option in checks:
        if not ok:
            raise ConfigError(
                f"{option}: this encoder has no exact Hugging Face class; {CLASS} needs "
                f"{BERT_OPTIONS}; or export with --format safetensors"
            )
    return "bert"


def bert_config(cfg: ModelConfig, vocab_size: int, special: dict[str, int | None]) -> dict[str, Any]:
    bert_flavour(cfg)
    return {
        "architectures": [CLASS],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ff_hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.positions,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "tie_word_embeddings": True,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "pad_token_id": special.get("pad"),
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
    }


def bert_model_config(config: dict[str, Any]) -> ModelConfig:
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"hidden_act = '{act}': Kiln's BERT uses the exact GELU in the FFN and the MLM head")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"position_embedding_type = '{config['position_embedding_type']}': Kiln's BERT has absolute positions only"
        )
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise ConfigError("a BERT decoder (is_decoder / add_cross_attention) has no Kiln form")
    if config.get("tie_word_embeddings") is False:
        raise ConfigError("tie_word_embeddings = false: Kiln maps only BERT's decoder tied to the word embeddings")
    d, context = config["hidden_size"], config.get("max_position_embeddings", 512)
    dropout = config.get("hidden_dropout_prob", 0.1)
    if config.get("attention_probs_dropout_prob", dropout) != dropout:
        raise ConfigError("hidden_dropout_prob and attention_probs_dropout_prob differ: Kiln has one model.dropout")
    return ModelConfig(
        family="encoder",
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        d_model=d,
        d_ff=config.get("intermediate_size", 4 * d),
        seq_len=min(context, 512),
        max_seq_len=context,
        pos="learned",
        norm="layernorm",
        norm_eps=config.get("layer_norm_eps", 1e-12),
        mlp="gelu_exact",
        bias=True,
        tie_embeddings=True,
        dropout=dropout,
        norm_position="post",
        embed_norm=True,
        type_vocab_size=config.get("type_vocab_size", 2),
        init_std=config.get("initializer_range", 0.02),
    )


def _block_names(i: int) -> dict[str, str]:
    h = f"bert.encoder.layer.{i}."
    names = {
        "attn.wq": "attention.self.query",
        "attn.wk": "attention.self.key",
        "attn.wv": "attention.self.value",
        "attn.wo": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "mlp.w1": "intermediate.dense",
        "mlp.w2": "output.dense",
        "mlp_norm": "output.LayerNorm",
    }
    return {f"layers.{i}.{k}.{p}": h + f"{v}.{p}" for k, v in names.items() for p in ("weight", "bias")}


TOP = {
    "pos_emb.weight": "bert.embeddings.position_embeddings.weight",
    "type_emb.weight": "bert.embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "bert.embeddings.LayerNorm.weight",
    "embed_norm.bias": "bert.embeddings.LayerNorm.bias",
    "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
}
VOCAB = {"tok_emb.weight": "bert.embeddings.word_embeddings.weight", "mlm_head.bias": "cls.predictions.bias"}


def names(cfg: ModelConfig) -> dict[str, str]:
    """Kiln name -> BertForMaskedLM name, for every tensor."""
    out = {**TOP, **VOCAB}
    for i in range(cfg.n_layers):
        out.update(_block_names(i))
    return out


def bert_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    bert_flavour(cfg)
    return {
        hf_name: (state[k][:vocab_size] if k in VOCAB else state[k]).contiguous() for k, hf_name in names(cfg).items()
    }


def bert_from_hf(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bert_flavour(cfg)
    mapping = names(cfg)
    missing = [v for v in mapping.values() if v not in hf]
    if missing:
        raise ConfigError(f"the checkpoint has no tensor '{missing[0]}', which a {CLASS} with this config.json has")
    # tied copies and parts BertForMaskedLM does not use (a pretraining checkpoint's pooler and NSP head)
    ignorable = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "bert.embeddings.position_ids"}
    extra = sorted(
        k
        for k in set(hf) - set(mapping.values()) - ignorable
        if not k.startswith(("bert.pooler.", "cls.seq_relationship."))
    )
    if extra:
        raise ConfigError(
            f"the checkpoint has tensors this mapping does not place ({', '.join(extra[:3])}); is "
            "config.json the one it was saved with?"
        )
    return {k: hf[v].contiguous() for k, v in mapping.items()}


ENCODER_HF = HFAdapter(
    model_types=("bert",),
    flavour=bert_flavour,
    config=bert_config,
    to_hf=bert_to_hf,
    model_config=bert_model_config,
    from_hf=bert_from_hf,
)
