"""The `moe` family: the GPT-style decoder with mixture-of-experts feed-forward blocks on the
layers `[model.moe]` every / first_dense pick (kiln.model.moe), the rest dense.

Counts follow the sparsity: `flops_per_token` (and so MFU and the scaling accounting) counts the
*active* parameters — the router, the k chosen experts and the shared experts of each MoE layer —
while `count_params` (and so the memory estimate) counts every expert.
"""

from __future__ import annotations

from torch import nn

from kiln.config import Config, ModelConfig
from kiln.model import mup
from kiln.model.decoder import Transformer
from kiln.model.moe import MoEFeedForward, is_moe_layer
from kiln.model.spec import ModelSpec, normal_std_for_depth
from kiln.model.transformer_spec import (
    activation_bytes,
    attention_logits,
    matmul_params,
    model_params,
    pipeline_stage,
    require,
    transformer_blocks,
    transformer_init_rule,
    validate_transformer,
)

SCORES = ("softmax", "sigmoid")


def validate_moe(cfg: Config) -> None:
    """The `[model.moe]` table's checks; messages name its keys by their flat names (`model.moe_top_k`)."""
    validate_transformer(cfg, experts=True)
    m, e = cfg.model, cfg.model.moe
    require(e.experts >= 2, f"model.family = 'moe' needs model.moe_experts >= 2, got {e.experts}")
    require(
        1 <= e.top_k <= e.experts,
        f"model.moe_top_k = {e.top_k} must be between 1 and model.moe_experts = {e.experts}",
    )
    require(e.every >= 1, f"model.moe_every must be >= 1, got {e.every}")
    require(
        0 <= e.first_dense < m.n_layers,
        f"model.moe_first_dense = {e.first_dense} leaves no MoE layer among model.n_layers = {m.n_layers}; lower it",
    )
    require(m.mlp == "swiglu", f"model.family = 'moe' has SwiGLU experts; set model.mlp = 'swiglu' (got {m.mlp!r})")
    require(not m.bias, "model.family = 'moe' has no biases in its experts; set model.bias = false")
    require(e.score in SCORES, f"model.moe_score = {e.score!r} is not allowed; choose one of {', '.join(SCORES)}")
    for key in ("d_ff", "shared_experts", "capacity_factor", "aux_loss", "seq_aux_loss", "z_loss", "bias_rate"):
        require(getattr(e, key) >= 0, f"model.moe_{key} must be >= 0, got {getattr(e, key)}")
    require(
        e.experts % cfg.parallel.ep == 0,
        f"parallel.ep = {cfg.parallel.ep} must divide model.moe_experts = "
        f"{e.experts} (each expert-parallel rank holds the same number of experts)",
    )
    require(
        e.capacity_factor == 0 or e.capacity_factor >= 1 / e.top_k,
        f"model.moe_capacity_factor = {e.capacity_factor} would drop most tokens; use 0 (dropless) or >= 1",
    )


class MoEDecoder(Transformer):
    """The decoder trunk with `MoEFeedForward` in place of the MLP of every MoE layer."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, causal=True)
        for name, block in self.layers.items():
            if is_moe_layer(cfg, int(name)):
                block.mlp = MoEFeedForward(cfg)

    def init_buffers(self) -> None:
        super().init_buffers()
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                module.reset_buffers()


EXPERT_RESIDUAL_OUTPUTS = ("mlp.experts.w2", "mlp.shared.w2.weight")  # the experts' (E, h, d) and the shared experts'


def moe_init_rule(name: str, ndim: int, cfg: ModelConfig) -> tuple[str, float]:
    """The decoder's rule; the experts' stacked down projections and the shared experts' are
    residual outputs too (depth-scaled); routers and the other expert weights N(0, init_std)."""
    if name.endswith(EXPERT_RESIDUAL_OUTPUTS):
        return "normal", normal_std_for_depth(cfg.init_std, cfg.n_layers) * mup.init_std_mult(name, ndim, cfg)
    return transformer_init_rule(name, ndim, cfg)


def _moe_layer_count(cfg: ModelConfig) -> int:
    return sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers))


def _dense_mlp(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.ff_hidden


def _expert(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.expert_hidden


def active_matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Weights one token multiplies with: the dense count, with each MoE layer's MLP replaced by
    its router, k routed experts and the shared experts."""
    e = cfg.moe
    per_layer = cfg.d_model * e.experts + _expert(cfg) * (e.top_k + e.shared_experts)
    return matmul_params(cfg, vocab_size) + _moe_layer_count(cfg) * (per_layer - _dense_mlp(cfg))


def moe_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Every parameter: all experts, routers and shared experts."""
    e = cfg.moe
    per_layer = cfg.d_model * e.experts + _expert(cfg) * (e.experts + e.shared_experts)
    return model_params(cfg, vocab_size) + _moe_layer_count(cfg) * (per_layer - _dense_mlp(cfg))


def moe_flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """6 x the active matrix weights + the attention term (as the dense decoder's)."""
    return 6.0 * active_matmul_params(cfg, vocab_size) + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len


def expert_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Each MoE block with its experts module, for expert parallelism (kiln.parallel.experts)."""
    return [(m, m.experts) for m in model.modules() if isinstance(m, MoEFeedForward)]


MOE = ModelSpec(
    name="moe",
    build=MoEDecoder,
    validate=validate_moe,
    blocks=transformer_blocks,
    init_rule=moe_init_rule,
    tensor_parallel="transformer",
    pipeline_stage=pipeline_stage,
    count_params=moe_params,
    flops_per_token=moe_flops_per_token,
    activation_bytes=activation_bytes,
    monitor_modules=("layers.*.attn", "layers.*.mlp"),
    attention_logits=attention_logits,
    attention_modules=("layers.*.attn",),
    causal=True,
    expert_modules=expert_modules,
    hf_adapter="mixtral",
)
