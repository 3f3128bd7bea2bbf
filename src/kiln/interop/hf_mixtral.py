"""Hugging Face mapping of the `moe` family's Mixtral-shaped models: `MixtralForCausalLM`.

Exact or refused, as the dense mappings (kiln.interop.hf). Verified against `transformers`'
modeling_mixtral: the router is a bias-free linear layer `block_sparse_moe.gate` whose logits
go through a float32 softmax over all experts, top-k, and gates renormalised over the k chosen
(Kiln: `moe_score = "softmax"`, `moe_norm_topk = true`); experts are SwiGLU with `silu`; no
shared experts, no selection bias, every layer sparse. Inference is dropless in both (Kiln's
capacity limit applies while training only). Attention, norms and RoPE are Llama's.

Weights are written in the layout every Mixtral checkpoint on the Hub has — one `nn.Linear` per
expert, `block_sparse_moe.experts.<e>.w1 / w2 / w3.weight` ((h, d), (d, h), (h, d)) — which
`transformers` 4.x loads as is and 5.x converts on load into its fused `mlp.experts.gate_up_proj`
/ `down_proj`; both forms import.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch

from kiln.config import ModelConfig, MoEConfig
from kiln.interop.hf import LLAMA_BLOCK, HFAdapter, _split, hf_config, kiln_model_config, refuse, refuse_unplaced
from kiln.model import mup

ATTENTION = {k: v for k, v in LLAMA_BLOCK.items() if not k.startswith("mlp.")}
EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def mixtral_flavour(cfg: ModelConfig) -> str:
    """'mixtral', or a ConfigError naming the first option MixtralForCausalLM cannot hold."""
    name, e = "MixtralForCausalLM", cfg.moe
    checks = (
        (cfg.pos == "rope", f"model.pos = '{cfg.pos}'", "model.pos = 'rope'"),
        (cfg.norm == "rmsnorm", f"model.norm = '{cfg.norm}'", "model.norm = 'rmsnorm'"),
        (not cfg.bias, "model.bias = true", "model.bias = false"),
        (not cfg.qk_norm and not cfg.post_norm, "model.qk_norm / model.post_norm", "neither"),
        (e.score == "softmax", f"model.moe_score = '{e.score}'", "model.moe_score = 'softmax'"),
        (e.norm_topk, "model.moe_norm_topk = false", "renormalised top-k gates"),
        (e.shared_experts == 0, f"model.moe_shared_experts = {e.shared_experts}", "no shared experts"),
        (
            e.every == 1 and e.first_dense == 0,
            f"model.moe_every = {e.every}, model.moe_first_dense = {e.first_dense}",
            "every layer sparse (moe_every = 1, moe_first_dense = 0)",
        ),
        (
            e.bias_rate == 0,
            f"model.moe_bias_rate = {e.bias_rate:g}",
            "no expert-selection bias (model.moe_bias_rate = 0)",
        ),
    )
    for ok, option, need in checks:
        if not ok:
            refuse(f"{option}: {name} needs {need}; export with --format safetensors")
    return "mixtral"


def mixtral_config(cfg: ModelConfig, vocab_size: int, special: dict[str, int | None]) -> dict[str, Any]:
    mixtral_flavour(cfg)
    dense = replace(cfg, family="decoder", moe=MoEConfig(), d_ff=cfg.expert_hidden)
    config = hf_config(dense, vocab_size, special)  # Llama's attention, norms and RoPE keys
    config.pop("mlp_bias", None)
    config.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=cfg.moe.experts,
        num_experts_per_tok=cfg.moe.top_k,
        router_aux_loss_coef=cfg.moe.aux_loss,
        output_router_logits=False,
        router_jitter_noise=0.0,
        sliding_window=None,
    )
    return config


def mixtral_model_config(config: dict[str, Any]) -> ModelConfig:
    if config.get("model_type") != "mixtral":
        refuse(f"model_type = '{config.get('model_type')}' is not Mixtral")
    if config.get("sliding_window"):
        refuse(f"sliding_window = {config['sliding_window']}: Kiln's attention has no sliding window")
    if config.get("router_jitter_noise"):
        refuse(f"router_jitter_noise = {config['router_jitter_noise']}: Kiln's router adds no noise")
    llama = kiln_model_config({**config, "model_type": "llama", "attention_bias": False, "mlp_bias": False})
    experts = MoEConfig(
        experts=config["num_local_experts"],
        top_k=config["num_experts_per_tok"],
        d_ff=config["intermediate_size"],
        aux_loss=float(config.get("router_aux_loss_coef", 0.0)),
        bias_rate=0.0,
    )
    return replace(llama, family="moe", d_ff=0, moe=experts)


def mixtral_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    mixtral_flavour(cfg)
    state = mup.fold_into_standard(cfg, state)  # a µP model's multipliers into its weights
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            continue
        index, rest = _split(name)
        block = f"model.layers.{index}."
        if rest in ATTENTION:
            out[block + ATTENTION[rest]] = value
        elif rest == "mlp.router.weight":
            out[block + "block_sparse_moe.gate.weight"] = value
        elif rest in ("mlp.experts.w1", "mlp.experts.w2", "mlp.experts.w3"):
            for e in range(value.shape[0]):  # Kiln's x @ w[e] is Linear's x @ weight.T
                out[block + f"block_sparse_moe.experts.{e}.{rest[-2:]}.weight"] = value[e].T
        elif rest == "mlp.expert_bias":
            if torch.any(value != 0):
                refuse("the model's expert-selection bias is not zero: MixtralForCausalLM's router has none")
        else:
            refuse(f"'{name}' has no place in MixtralForCausalLM")
    out["model.embed_tokens.weight"] = state["tok_emb.weight"][:vocab_size]
    out["model.norm.weight"] = state["norm.weight"]
    if "head.weight" in state:
        out["lm_head.weight"] = state["head.weight"][:vocab_size]
    return {k: v.contiguous() for k, v in out.items()}


def mixtral_from_hf(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either weight layout (per-expert Linears, or transformers 5's fused gate_up_proj /
    down_proj) -> Kiln's names; a missing or unplaced tensor is an error."""
    mixtral_flavour(cfg)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            refuse(f"the checkpoint has no tensor '{name}', which a MixtralForCausalLM with this config.json has")
        used.add(name)
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    E, h = cfg.moe.experts, cfg.expert_hidden
    reverse = {v: k for k, v in ATTENTION.items()}
    for index in range(cfg.n_layers):
        block = f"model.layers.{index}."
        for hf_rest, kiln_rest in reverse.items():
            if block + hf_rest in hf:
                out[f"layers.{index}.{kiln_rest}"] = take(block + hf_rest)
        kiln = f"layers.{index}.mlp."
        fused = block + "mlp.experts.gate_up_proj"
        if fused in hf:  # transformers 5: gate_up (E, 2h, d), down (E, d, h)
            gate_up = take(fused)
            out[kiln + "experts.w1"] = gate_up[:, :h].transpose(1, 2)
            out[kiln + "experts.w3"] = gate_up[:, h:].transpose(1, 2)
            out[kiln + "experts.w2"] = take(block + "mlp.experts.down_proj").transpose(1, 2)
            out[kiln + "router.weight"] = take(block + "mlp.gate.weight")
        else:
            for w in ("w1", "w2", "w3"):
                out[kiln + f"experts.{w}"] = torch.stack(
                    [take(block + f"block_sparse_moe.experts.{e}.{w}.weight").T for e in range(E)]
                )
            out[kiln + "router.weight"] = take(block + "block_sparse_moe.gate.weight")
        out[kiln + "expert_bias"] = torch.zeros(E)
    out["tok_emb.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        out["head.weight"] = take("lm_head.weight")
    refuse_unplaced(hf, used | ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    return {k: v.contiguous() for k, v in out.items()}


MIXTRAL_HF = HFAdapter(
    model_types=("mixtral",),
    flavour=mixtral_flavour,
    config=mixtral_config,
    to_hf=mixtral_to_hf,
    model_config=mixtral_model_config,
    from_hf=mixtral_from_hf,
)
