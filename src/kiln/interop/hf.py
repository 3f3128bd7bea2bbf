"""Hugging Face Transformers mappings of Kiln's decoder: Llama, Qwen3 (Llama with QK-norm) and GPT-2.

Each mapping is exact or refused. `hf_flavour` names the `transformers` class a Kiln config maps
to, or raises one line naming the option that class cannot express; `to_hf` / `from_hf` convert
configs and state dicts both ways with the true vocabulary size (Kiln pads its embedding to a
multiple of 64; the padding rows never leave Kiln, and come back as zeros).

Verified against the `transformers` source (modeling_llama, modeling_qwen3, modeling_gpt2):
- RoPE: both rotate halves (x[..., :d/2], x[..., d/2:]) with inv_freq = theta^(-2i/d), so q and k
  need no permutation (Meta's original checkpoints interleave pairs; HF's converter permutes
  those, and Kiln already uses the HF layout).
- Llama: `attention_bias` covers q, k, v and o; `mlp_bias` gate, up and down. Kiln's `model.bias`
  is both. RMSNorm in float32 with the gain applied after the cast back, as torch's RMSNorm.
- Qwen3: Llama plus a per-head RMSNorm on q and k before RoPE (Kiln's `model.qk_norm`); its MLP
  has no bias, so a biased Kiln model has no Qwen3 form.
- GPT-2: `Conv1D` stores weights as (in, out), so every projection is transposed; q, k and v are
  fused in `c_attn`. Kiln's GELU is the tanh approximation (`gelu_pytorch_tanh`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.model import mup

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")  # the same function; gelu_new spells the formula out


def refuse(message: str) -> None:
    raise ConfigError(message)


# ----------------------------------------------------------------------------- which class
def hf_flavour(cfg: ModelConfig) -> str:
    """'llama', 'qwen3' or 'gpt2' for a Kiln decoder config; a ConfigError naming the first
    option the matching `transformers` class cannot hold otherwise."""
    if cfg.family != "decoder":
        refuse(f"model.family = '{cfg.family}' has no Hugging Face mapping yet; export it with --format safetensors")
    if cfg.post_norm:
        refuse(
            "model.post_norm = true (sandwich norm) has no Llama, Qwen3 or GPT-2 form; export with --format safetensors"
        )
    if cfg.pos == "rope":
        target = "qwen3" if cfg.qk_norm else "llama"
        name = HF_CLASSES[target]
        if cfg.norm != "rmsnorm":
            refuse(f"model.norm = '{cfg.norm}' with rotary positions: {name} needs model.norm = 'rmsnorm'")
        if cfg.mlp != "swiglu":
            refuse(f"model.mlp = '{cfg.mlp}' with rotary positions: {name} needs model.mlp = 'swiglu'")
        if target == "qwen3" and cfg.bias:
            refuse(
                "model.bias = true with model.qk_norm = true: Qwen3ForCausalLM's MLP has no biases; set "
                "model.bias = false or model.qk_norm = false (Llama holds biases)"
            )
        return target
    name = HF_CLASSES["gpt2"]
    for ok, option, need in (
        (cfg.norm == "layernorm", f"model.norm = '{cfg.norm}'", "model.norm = 'layernorm'"),
        (cfg.mlp in ("gelu", "gelu_exact"), f"model.mlp = '{cfg.mlp}'", "a GELU MLP"),
        (cfg.bias, "model.bias = false", "model.bias = true"),
        (not cfg.qk_norm, "model.qk_norm = true", "no QK-norm"),
        (
            cfg.kv_heads == cfg.n_heads,
            f"model.n_kv_heads = {cfg.n_kv_heads} (grouped-query attention)",
            "one KV head per head",
        ),
    ):
        if not ok:
            refuse(f"{option} with learned positions: {name} needs {need} (rotary models map to Llama)")
    return "gpt2"


# ----------------------------------------------------------------------------- configs
def hf_config(cfg: ModelConfig, vocab_size: int, special: dict[str, int | None]) -> dict[str, Any]:
    """config.json for the flavour of `cfg`, with the true vocabulary size."""
    flavour = hf_flavour(cfg)
    ids = {f"{r}_token_id": special.get(r) for r in ("bos", "eos", "pad")}
    context = cfg.positions
    if flavour == "gpt2":
        return {
            "architectures": [HF_CLASSES["gpt2"]],
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ff_hidden,
            "n_positions": context,
            "n_ctx": context,
            "activation_function": "gelu" if cfg.mlp == "gelu_exact" else "gelu_pytorch_tanh",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "use_cache": True,
            "torch_dtype": "float32",
            **ids,
        }
    head_dim = cfg.head_dim
    config = {
        "architectures": [HF_CLASSES[flavour]],
        "model_type": flavour,
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": cfg.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": "float32",
        **ids,
    }
    if flavour == "llama":
        config["mlp_bias"] = cfg.bias
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return config


def _get(config: dict[str, Any], key: str, default: Any = None) -> Any:
    return config.get(key, default) if config.get(key) is not None else default


def kiln_model_config(config: dict[str, Any]) -> ModelConfig:
    """A Kiln decoder config from a Llama, Qwen3 or GPT-2 config.json; a ConfigError naming the
    option Kiln cannot express otherwise."""
    kind = config.get("model_type")
    if kind == "gpt2":
        d, heads = config["n_embd"], config["n_head"]
        act = config.get("activation_function", "gelu_new")
        if act not in (*TANH_GELUS, "gelu"):
            refuse(f"activation_function = '{act}': Kiln's GPT-2 MLP is a GELU ({', '.join(TANH_GELUS)} or gelu)")
        if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx"):
            refuse(
                "GPT-2 attention without the 1/sqrt(head size) scale (scale_attn_weights = false or "
                "scale_attn_by_inverse_layer_idx = true) has no Kiln form"
            )
        return ModelConfig(
            family="decoder",
            n_layers=config["n_layer"],
            n_heads=heads,
            n_kv_heads=0,
            d_model=d,
            d_ff=_get(config, "n_inner", 4 * d),
            seq_len=min(config["n_positions"], 1024),
            max_seq_len=config["n_positions"],
            pos="learned",
            norm="layernorm",
            norm_eps=config.get("layer_norm_epsilon", 1e-5),
            mlp="gelu_exact" if act == "gelu" else "gelu",
            bias=True,
            tie_embeddings=config.get("tie_word_embeddings", True),
            init_std=config.get("initializer_range", 0.02),
        )
    if kind not in ("llama", "qwen3"):
        refuse(f"model_type = '{kind}' is not a family Kiln imports; supported: llama, qwen3, gpt2")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        refuse(f"rope scaling ({scaling or rope}) has no Kiln form; Kiln's RoPE is the default one")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    head_dim = config.get("head_dim") or d // heads
    if head_dim * heads != d:
        refuse(
            f"head_dim = {head_dim} with hidden_size = {d} and {heads} heads: Kiln's heads are "
            "hidden_size / num_attention_heads wide"
        )
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act = '{config['hidden_act']}': Kiln's SwiGLU uses silu")
    attn_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False)) if kind == "llama" else False
    if attn_bias != mlp_bias:
        refuse(f"attention_bias = {attn_bias} with mlp_bias = {mlp_bias}: Kiln's model.bias sets both")
    if kind == "qwen3" and config.get("use_sliding_window"):
        refuse("use_sliding_window = true: Kiln's attention has no sliding window")
    context = config.get("max_position_embeddings", 2048)
    return ModelConfig(
        family="decoder",
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        d_model=d,
        d_ff=config["intermediate_size"],
        seq_len=min(context, 1024),
        max_seq_len=context,
        pos="rope",
        rope_theta=float(theta),
        norm="rmsnorm",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        bias=attn_bias,
        tie_embeddings=config.get("tie_word_embeddings", False),
        qk_norm=kind == "qwen3",
        init_std=config.get("initializer_range", 0.02),
    )


# ----------------------------------------------------------------------------- state dicts
LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    **{f"attn.w{a}.{p}": f"self_attn.{a}_proj.{p}" for a in "qkvo" for p in ("weight", "bias")},
    **{
        f"mlp.{k}.{p}": f"mlp.{v}.{p}"
        for k, v in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
        for p in ("weight", "bias")
    },
}
GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "mlp_norm": "ln_2",
    "attn.wo": "attn.c_proj",
    "mlp.w1": "mlp.c_fc",
    "mlp.w2": "mlp.c_proj",
}
VOCAB_TENSORS = ("tok_emb.weight", "head.weight", "mlm_head.bias")  # one row (entry) per token


def _split(name: str) -> tuple[str, str]:
    """'layers.3.attn.wq.weight' -> ('3', 'attn.wq.weight')."""
    _, index, rest = name.split(".", 2)
    return index, rest


def to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Kiln's (padded) state dict -> the flavour's names, layouts and true vocabulary (a µP
    model's multipliers folded into its weights first)."""
    flavour = hf_flavour(cfg)
    state = mup.fold_into_standard(cfg, state)
    out: dict[str, torch.Tensor] = {}
    cut = {k: state[k][:vocab_size] for k in VOCAB_TENSORS if k in state}
    if flavour in ("llama", "qwen3"):
        for name, value in state.items():
            if name.startswith("layers."):
                layer, rest = _split(name)
                out[f"model.layers.{layer}.{LLAMA_BLOCK[rest]}"] = value
        out["model.embed_tokens.weight"] = cut["tok_emb.weight"]
        out["model.norm.weight"] = state["norm.weight"]
        if "head.weight" in cut:
            out["lm_head.weight"] = cut["head.weight"]
        return {k: v.contiguous() for k, v in out.items()}
    for index in range(cfg.n_layers):
        p = f"layers.{index}."
        h = f"transformer.h.{index}."
        out[h + "attn.c_attn.weight"] = torch.cat([state[p + f"attn.w{a}.weight"] for a in "qkv"]).T  # (d, 3d)
        out[h + "attn.c_attn.bias"] = torch.cat([state[p + f"attn.w{a}.bias"] for a in "qkv"])
        for part in ("weight", "bias"):
            for kiln_name, hf_name in GPT2_BLOCK.items():
                value = state[p + f"{kiln_name}.{part}"]
                linear = "norm" not in kiln_name
                out[h + f"{hf_name}.{part}"] = value.T if linear and part == "weight" else value
    out["transformer.wte.weight"] = cut["tok_emb.weight"]
    out["transformer.wpe.weight"] = state["pos_emb.weight"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["norm.weight"], state["norm.bias"]
    if "head.weight" in cut:
        out["lm_head.weight"] = cut["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flavour's state dict -> Kiln's names with the true vocabulary (the model pads it when
    loading: `kiln.model.init.load_initial_weights`). Tensors the target has no place for, or
    that are missing, are an error: a conversion never drops or invents weights silently."""
    flavour = hf_flavour(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            refuse(f"the checkpoint has no tensor '{name}', which a {HF_CLASSES[flavour]} with this config.json has")
        used.add(name)
        return hf[name]

    if flavour in ("llama", "qwen3"):
        reverse = {v: k for k, v in LLAMA_BLOCK.items()}
        for index in range(cfg.n_layers):
            for hf_rest, kiln_rest in reverse.items():
                name = f"model.layers.{index}.{hf_rest}"
                if name in hf:
                    out[f"layers.{index}.{kiln_rest}"] = take(name)
        out["tok_emb.weight"] = take("model.embed_tokens.weight")
        out["norm.weight"] = take("model.norm.weight")
        if not cfg.tie_embeddings:
            out["head.weight"] = take("lm_head.weight")
        ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    else:
        d = cfg.d_model
        for index in range(cfg.n_layers):
            p, h = f"layers.{index}.", f"transformer.h.{index}."
            qkv_w, qkv_b = take(h + "attn.c_attn.weight").T, take(h + "attn.c_attn.bias")
            for i, a in enumerate("qkv"):
                out[p + f"attn.w{a}.weight"] = qkv_w[i * d : (i + 1) * d]
                out[p + f"attn.w{a}.bias"] = qkv_b[i * d : (i + 1) * d]
            for kiln_name, hf_name in GPT2_BLOCK.items():
                for part in ("weight", "bias"):
                    value = take(h + f"{hf_name}.{part}")
                    out[p + f"{kiln_name}.{part}"] = value.T if "norm" not in kiln_name and part == "weight" else value
        out["tok_emb.weight"] = take("transformer.wte.weight")
        out["pos_emb.weight"] = take("transformer.wpe.weight")
        out["norm.weight"], out["norm.bias"] = take("transformer.ln_f.weight"), take("transformer.ln_f.bias")
        if not cfg.tie_embeddings:
            out["head.weight"] = take("lm_head.weight")
        # attention-mask buffers older GPT-2 checkpoints carry are not weights
        ignorable = {k for k in hf if k.endswith((".attn.bias", ".attn.masked_bias")) and k not in used}
        ignorable |= {"lm_head.weight"} if cfg.tie_embeddings else set()
    refuse_unplaced(hf, used | ignorable)
    return {k: v.contiguous() for k, v in out.items()}


def refuse_unplaced(hf: dict[str, torch.Tensor], placed: set[str]) -> None:
    """A checkpoint's tensors that a mapping did not place are an error, never dropped silently."""
    extra = sorted(set(hf) - placed)
    if extra:
        refuse(
            f"the checkpoint has tensors this mapping does not place ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}); is config.json the one it was saved with?"
        )


@dataclass(frozen=True)
class HFAdapter:
    """What a model family's `ModelSpec.hf_adapter` provides for `kiln export --format hf`,
    `kiln import` and `kiln.load`."""

    model_types: tuple[str, ...]  # config.json model_type values it imports
    flavour: Callable[[ModelConfig], str]  # the HF flavour of a Kiln config, or a ConfigError
    config: Callable[[ModelConfig, int, dict[str, int | None]], dict[str, Any]]  # -> config.json
    to_hf: Callable[[ModelConfig, dict[str, torch.Tensor], int], dict[str, torch.Tensor]]
    model_config: Callable[[dict[str, Any]], ModelConfig]  # config.json -> Kiln model config
    from_hf: Callable[[ModelConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


DECODER_HF = HFAdapter(
    model_types=("llama", "qwen3", "gpt2"),
    flavour=hf_flavour,
    config=hf_config,
    to_hf=to_hf,
    model_config=kiln_model_config,
    from_hf=from_hf,
)
