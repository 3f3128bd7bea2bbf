"""Model families by name: `model.family` selects a `ModelSpec` (builder, validation, parallel
plans, init rule, counts). Built in: `decoder` and `encoder` (kiln.model.transformer_spec), `moe`
(kiln.model.moe_spec) and `vlm` (kiln.model.vision_spec); a plugin adds its own with
`register_model_family(ModelSpec(name, build, ...))`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kiln.config import Config, ModelConfig
from kiln.errors import ConfigError
from kiln.model.init import Writer, copy_full, init_parameters
from kiln.model.moe_spec import MOE
from kiln.model.spec import VOCAB_MULTIPLE, ModelSpec, padded_vocab
from kiln.model.transformer_spec import DECODER, ENCODER
from kiln.model.vision_spec import VLM
from kiln.plugins import load_plugins

__all__ = [
    "MODEL_SPECS",
    "ModelSpec",
    "VOCAB_MULTIPLE",
    "build_model",
    "get_spec",
    "initialise",
    "padded_vocab",
    "register_model_family",
]

MODEL_SPECS: dict[str, ModelSpec] = {}


def register_model_family(spec: ModelSpec) -> ModelSpec:
    """Make `model.family = spec.name` select this family (a later registration replaces an
    earlier one of the same name)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model_family takes a ModelSpec, got {type(spec).__name__}")
    MODEL_SPECS[spec.name] = spec
    return spec


def register_model(name: str) -> Callable[[Callable[[ModelConfig, int], nn.Module]], Callable]:
    """Decorator shorthand: a builder `(ModelConfig, vocab) -> nn.Module` becomes a family with
    the generic defaults of `ModelSpec`."""

    def wrap(builder: Callable[[ModelConfig, int], nn.Module]) -> Callable:
        register_model_family(ModelSpec(name=name, build=builder))
        return builder

    return wrap


register_model_family(DECODER)
register_model_family(ENCODER)
register_model_family(MOE)
register_model_family(VLM)


def get_spec(family: str) -> ModelSpec:
    if family not in MODEL_SPECS:
        raise ConfigError(
            f"model.family = {family!r} is not a registered model family; registered: "
            f"{', '.join(MODEL_SPECS)} (a plugin adds one with register_model_family)"
        )
    return MODEL_SPECS[family]


def resolve_family(cfg: Config) -> ModelSpec:
    """The spec of `cfg.model.family` (plugins loaded first), after its own config checks."""
    load_plugins()
    spec = get_spec(cfg.model.family)
    spec.validate(cfg)
    return spec


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The family's model for a tokenizer of `vocab_size` (the embedding is padded); its
    parameters are uninitialised: call `initialise` (or build on the meta device and let
    `kiln.parallel.apply.materialise` do it)."""
    return get_spec(cfg.family).build(cfg, padded_vocab(vocab_size))


def initialise(model: nn.Module, cfg: ModelConfig, seed: int, write: Writer = copy_full) -> nn.Module:
    """Initialise `model` by its family's rule, layout-independently (kiln.model.init)."""
    init_parameters(model, get_spec(cfg.family).init_rule, cfg, seed, write)
    return model


@torch.no_grad()
def fresh_model(cfg: ModelConfig, vocab_size: int, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """A whole model on `device`, initialised as training initialises it."""
    return initialise(build_model(cfg, vocab_size).to(device), cfg, seed)
