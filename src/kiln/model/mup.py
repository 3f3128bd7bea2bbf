"""µP, the maximal-update parametrisation (Yang et al. 2021, "Tensor Programs V"), so that
hyperparameters tuned at `model.mup_base_width` transfer to wider models (`model.parametrization
= "mup"`). With width multiplier m = d_model / mup_base_width, as the µP tables prescribe for
Adam-style optimizers (Table 3 of the paper, the `mup` package's MuAdam and MuReadout):

    hidden matrices (attention, MLP, experts, routers)   init std / sqrt(m), AdamW LR / m
    embeddings (tokens, positions, image stem), norms, biases   unchanged
    output logits                                       times 1 / m (on the final norm's output)
    attention scores                                    q·k · sqrt(d0) / head_dim, d0 the base
                                                        model's head width (1/sqrt(head_dim) at m = 1)

At m = 1 a µP model is the standard one. Muon needs no LR factor: its update is orthogonalised
and scaled by the matrix's shape (`optim.muon_adjust_lr = "spectral"`), the spectral scaling that
µP's condition asks of hidden layers (Bernstein et al. 2024, "A spectral condition for feature
learning"). The output multiplier is applied to the final norm's output, so every loss head (the
naive one, the chunked kernel, tensor-parallel logits) sees it, and an export folds it into the
final norm's gain (kiln.interop.convert): the exported model needs no multiplier, tied or not.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig

# parameters whose owner is an input or output layer of the model: no width scaling of their init
NOT_HIDDEN = ("tok_emb", "pos_emb", "type_emb", "head", "patch_pos", "stem")


def is_mup(cfg: ModelConfig) -> bool:
    return cfg.parametrization == "mup"


def width_mult(cfg: ModelConfig) -> float:
    """m = d_model / mup_base_width under µP, else 1."""
    return cfg.d_model / cfg.mup_base_width if is_mup(cfg) else 1.0


def output_mult(cfg: ModelConfig) -> float | None:
    """What the final norm's output is multiplied by (None: nothing, the standard model)."""
    return 1.0 / width_mult(cfg) if is_mup(cfg) else None


def attention_ratio(cfg: ModelConfig) -> float:
    """µP's attention scale over the standard 1 / sqrt(head_dim): sqrt(d0 / head_dim), d0 the base
    model's head width (1 at the base width)."""
    return (cfg.mup_base_width // cfg.n_heads / cfg.head_dim) ** 0.5


def attention_scale(cfg: ModelConfig) -> float | None:
    """The attention scores' scale (None: SDPA's default 1 / sqrt(head_dim))."""
    return attention_ratio(cfg) / cfg.head_dim**0.5 if is_mup(cfg) else None


def init_std_mult(name: str, ndim: int, cfg: ModelConfig) -> float:
    """The factor on a parameter's initial std: 1 / sqrt(m) for hidden matrices under µP."""
    if not is_mup(cfg) or ndim < 2 or name.split(".", 1)[0] in NOT_HIDDEN:
        return 1.0
    return width_mult(cfg) ** -0.5


def fold_into_standard(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A µP model's full state dict with its multipliers folded into weights, so a standard
    implementation (an export) computes the same logits: the output multiplier into the final
    norm's gain (and bias), the attention scale's ratio to 1/sqrt(head_dim) into the query
    projection (into the query norm's gain under QK-norm, which would undo a scaled projection).
    Tied embeddings stay tied: the embedding matrix is untouched. The standard model's dict as is."""
    if not is_mup(cfg):
        return state
    out = dict(state)
    mult = 1.0 / width_mult(cfg)
    for key in ("norm.weight", "norm.bias"):
        if key in out:
            out[key] = out[key] * mult
    ratio = attention_ratio(cfg)
    if ratio != 1.0:
        targets = ("attn.q_norm.weight",) if cfg.qk_norm else ("attn.wq.weight", "attn.wq.bias")
        for key in list(out):
            if key.startswith("layers.") and key.split(".", 2)[2] in targets:
                out[key] = out[key] * ratio
    return out
