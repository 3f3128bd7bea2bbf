"""FP8 training through torchao float8 (`kernels.float8 = "tensorwise" | "rowwise"`).

The blocks' linear layers become torchao `Float8Linear`s: inputs, weights and gradients are cast
to float8 with dynamic scales (one per tensor, or one per row) for the three matrix products, with
float32 master weights, so checkpoints keep their names and dtypes. The output head, MoE routers and layers
whose sides are not multiples of 16 (what FP8 matrix kernels need) stay in the run's precision.
With FSDP2 and the tensorwise recipe the parameters are all-gathered in float8 (half of bf16's
traffic; the same numbers, as the scale is the whole tensor's either way). FP8 matrix units exist
on sm89+ GPUs (Ada, Hopper, Blackwell); on a CPU torchao emulates them, which checks a run's
numbers but is slower than float32 — never faster.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.kernels.ao import torchao

RECIPES = ("none", "tensorwise", "rowwise")


def float8_layer(module: nn.Module, fqn: str) -> bool:
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("layers.")
        and not fqn.endswith(".router")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def check_float8(recipe: str, device: torch.device, tp: int) -> None:
    """Refuse, in one line, a float8 setting this machine or layout cannot run."""
    where = f"kernels.float8 = '{recipe}'"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(
                f"{where} needs a GPU with FP8 matrix units (compute capability 8.9+: L4, H100, "
                f"B200 ...); this one is {major}.{minor}; set kernels.float8 = 'none'"
            )
    if tp > 1:
        raise ConfigError(
            f"{where} works with parallel.tp = 1 for now (tensor-parallel plans would need float8 "
            "variants); set kernels.float8 = 'none' or parallel.tp = 1"
        )
    torchao("float8", where)


def apply_float8(model: nn.Module, recipe: str, fsdp_all_gather: bool) -> int:
    """Swap `model`'s eligible linears for Float8Linear; returns how many."""
    f8 = torchao("float8", f"kernels.float8 = '{recipe}'")
    config = f8.Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp_all_gather:
        config = f8.Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    chosen = sum(1 for fqn, m in model.named_modules() if float8_layer(m, fqn))
    f8.convert_to_float8_training(model, module_filter_fn=float8_layer, config=config)
    return chosen
