"""The transformer families' specs: the GPT-style `decoder` and the BERT-style `encoder`.

Everything here that names the model's attributes (`layers`, `tok_emb`, `attn.wo`, ...) is the
family's own knowledge, handed to the rest of Kiln through `ModelSpec` slots: validation of the
shape, the repeated blocks, the initialisation rule, the pipeline cut, parameter / FLOP /
activation counts and the attention probe used by monitoring. The specs name their
tensor-parallel plan and Hugging Face adapter; those live in the layers that apply them
(`kiln.parallel.plans`, `kiln.interop.adapters`), so the model imports neither.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from kiln.config import Config, ModelConfig
from kiln.config_rules import require
from kiln.model import mup
from kiln.model.decoder import Decoder, Transformer
from kiln.model.encoder import Encoder
from kiln.model.layers import Attention
from kiln.model.spec import ActivationBytes, ModelSpec, normal_std_for_depth, padded_vocab

RESIDUAL_OUTPUTS = ("attn.wo", "mlp.w2")  # projections into the residual stream get depth-scaled init


# --------------------------------------------------------------------------- validation


def validate_transformer(cfg: Config, *, experts: bool = False, post_norm_blocks: bool = False) -> None:
    """The shared transformer checks; a family's own validation says what it adds: `experts`
    (a `[model.moe]` table and parallel.ep), `post_norm_blocks` (model.norm_position = 'post')."""
    m, par = cfg.model, cfg.parallel
    require(
        m.moe.experts == 0 or experts,
        f"model.moe_experts = {m.moe.experts} needs model.family = 'moe' (model.family = '{m.family}' has no experts)",
    )
    require(
        par.ep == 1 or experts,
        f"parallel.ep = {par.ep} spreads experts; model.family = '{m.family}' has none (set parallel.ep = 1)",
    )
    require(
        m.norm_position == "pre" or post_norm_blocks,
        "model.norm_position = 'post' (BERT's blocks) is "
        "for model.family = 'encoder'; decoders are pre-norm (model.post_norm adds a sandwich norm)",
    )
    require(m.d_model % m.n_heads == 0, f"model.n_heads = {m.n_heads} must divide model.d_model = {m.d_model}")
    if m.parametrization == "mup":
        require(
            m.mup_base_width > 0 and m.mup_base_width % m.n_heads == 0,
            f"model.mup_base_width = {m.mup_base_width} must be a positive multiple of model.n_heads = "
            f"{m.n_heads} (the width µP's hyperparameters were tuned at, with as many heads)",
        )
    kv = m.kv_heads
    require(kv <= m.n_heads and m.n_heads % kv == 0, f"model.n_kv_heads = {kv} must divide model.n_heads = {m.n_heads}")
    head_dim = m.head_dim
    require(
        m.pos != "rope" or head_dim % 2 == 0,
        f"model.pos = 'rope' needs an even head size, got d_model/n_heads = {head_dim}",
    )
    require(
        m.n_heads % par.tp == 0 and kv % par.tp == 0,
        f"parallel.tp = {par.tp} must divide model.n_heads = {m.n_heads} and the KV heads = {kv}",
    )
    require(
        m.seq_len % par.tp == 0,
        f"parallel.tp = {par.tp} must divide model.seq_len = {m.seq_len} (sequence parallelism splits the sequence)",
    )
    if par.pp > 1:
        stages = par.pipeline_stages
        require(
            m.n_layers % stages == 0 or bool(par.pp_layers),
            f"model.n_layers = {m.n_layers} must be divisible "
            f"by the {stages} pipeline stages (parallel.pp x stages per rank), or give parallel.pp_layers",
        )
        require(
            not m.tie_embeddings,
            "parallel.pp > 1 needs model.tie_embeddings = false (the embedding and the "
            "output layer live on different stages)",
        )
    if par.tp > 1:
        require(
            not m.tie_embeddings,
            "parallel.tp > 1 needs model.tie_embeddings = false (the shared matrix would need two layouts)",
        )


def validate_encoder(cfg: Config) -> None:
    validate_transformer(cfg, post_norm_blocks=True)
    require(
        cfg.model.parametrization == "standard",
        "model.parametrization = 'mup' is for the decoder families (decoder, moe, vlm) for now; "
        "the encoder's masked-LM head has no µP readout yet",
    )
    require(
        cfg.parallel.tp == 1 and cfg.parallel.pp == 1,
        "model.family = 'encoder' trains with data "
        "parallelism (FSDP) only for now; set parallel.tp = 1 and parallel.pp = 1",
    )


# --------------------------------------------------------------------------- structure


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"layers.{name}", block) for name, block in cast(Transformer, model).layers.items()]


def transformer_init_rule(name: str, ndim: int, cfg: ModelConfig) -> tuple[str, float]:
    """GPT-2 / Llama practice: N(0, init_std) for matrices and embeddings, residual projections
    scaled by 1/sqrt(2L); biases zero, norm gains one."""
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    if leaf == "bias":
        return "zeros", 0.0
    if ndim == 1:
        return "ones", 0.0
    width = mup.init_std_mult(name, ndim, cfg)  # µP: hidden matrices 1/sqrt(width multiplier)
    if owner.endswith(RESIDUAL_OUTPUTS):
        return "normal", normal_std_for_depth(cfg.init_std, cfg.n_layers) * width
    return "normal", cfg.init_std * width


def pipeline_stage(model: nn.Module, stage: int, n_stages: int, layers: list[int] | None = None) -> nn.Module:
    """Keep only stage `stage`'s blocks (names unchanged, so checkpoints stay layout-independent):
    `layers[s]` blocks for stage s, or an even split; the embeddings stay on the first stage, the
    final norm and head on the last."""
    trunk = cast(Transformer, model)  # the decoder families' models
    counts = layers or [len(trunk.layers) // n_stages] * n_stages
    first = sum(counts[:stage])
    keep = {str(i) for i in range(first, first + counts[stage])}
    for name in list(trunk.layers.keys()):
        if name not in keep:
            del trunk.layers[name]
    if stage > 0:
        trunk.tok_emb = None
        trunk.pos_emb = None
    if stage < n_stages - 1:
        trunk.norm = None
        trunk.head = None
    return model


def attention_logits(module: nn.Module, args: tuple) -> torch.Tensor:
    """Pre-softmax attention scores (B, heads, T, T) of an `Attention` module for its forward
    arguments (x, rope, mask); masked positions are -inf."""
    return cast(Attention, module).logits(*args)


# --------------------------------------------------------------------------- counts


def matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Weights that take part in a matrix product per token: every projection and the output
    layer (counted even when tied to the embedding, since its product is done)."""
    d, L = cfg.d_model, cfg.n_layers
    attn = d * d * 2 + 2 * d * cfg.kv_heads * cfg.head_dim  # wq, wo, wk, wv
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.ff_hidden
    head = d * d if cfg.family == "encoder" else 0  # the masked-LM head's dense layer
    return L * (attn + mlp) + head + d * vocab_size


def model_params(cfg: ModelConfig, vocab_size: int) -> int:
    """All parameters: matrices, embeddings (padded vocabulary), norms and biases."""
    d, L = cfg.d_model, cfg.n_layers
    vocab = padded_vocab(vocab_size)
    n = matmul_params(cfg, vocab) - d * vocab  # blocks
    n += d * vocab * (1 if cfg.tie_embeddings else 2)
    if cfg.pos == "learned":
        n += cfg.positions * d
    norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    final_norm = 0 if cfg.norm_position == "post" else 1
    n += (2 * L * (2 if cfg.post_norm else 1) + final_norm + (1 if cfg.embed_norm else 0)) * norm
    n += cfg.type_vocab_size * d
    if cfg.qk_norm:
        n += 2 * L * (d // cfg.n_heads)
    if cfg.bias:
        hidden = cfg.ff_hidden * (2 if cfg.mlp == "swiglu" else 1)
        n += L * (2 * d + 2 * cfg.kv_heads * cfg.head_dim + hidden + d)
    if cfg.family == "encoder":  # the masked-LM head's norm, dense bias and output bias
        n += norm + ((d + vocab) if cfg.bias else 0)
    return n


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token = 6 N + 12 L d T (PaLM, appendix B): N counts the weights of
    matrix products, the second term the attention scores and values over a T-long context."""
    return 6.0 * matmul_params(cfg, vocab_size) + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len


def activation_bytes(cfg: ModelConfig, micro_batch: int, value_bytes: int) -> ActivationBytes:
    """Korthikanti et al. (2022): about 34 s b h bytes per layer at 16 bits with fused attention
    (no s^2 term), scaled to the activations' width; checkpointing keeps only the block input."""
    per_value = cfg.seq_len * micro_batch * cfg.d_model * value_bytes
    return ActivationBytes(stored=34 / 2 * per_value, inputs=per_value)


# --------------------------------------------------------------------------- the specs


DECODER = ModelSpec(
    name="decoder",
    build=Decoder,
    validate=validate_transformer,
    blocks=transformer_blocks,
    init_rule=transformer_init_rule,
    tensor_parallel="transformer",
    pipeline_stage=pipeline_stage,
    count_params=model_params,
    flops_per_token=flops_per_token,
    activation_bytes=activation_bytes,
    monitor_modules=("layers.*.attn", "layers.*.mlp"),
    attention_logits=attention_logits,
    attention_modules=("layers.*.attn",),
    causal=True,
    hf_adapter="llama",
)
# BERT's: the decoder's structure and counts, bidirectional, data parallelism only (for now)
ENCODER = dataclasses.replace(
    DECODER,
    name="encoder",
    build=Encoder,
    validate=validate_encoder,
    tensor_parallel=None,
    pipeline_stage=None,
    causal=False,
    hf_adapter="bert",
)
