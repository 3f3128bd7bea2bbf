"""2:4 semi-structured sparsity in training (`kernels.sparsity = "2:4"`, torchao, CUDA only).

The MLPs' linear weights are pruned at run time to two non-zeros in every four (the largest two
by magnitude, recomputed each step from the dense weights, which keep learning) and multiplied by
cuSPARSELt's sparse kernels: up to ~2x on those products on sm80+ GPUs. Attention projections stay
dense, as in torchao's recipe. No CPU kernel exists, so elsewhere it is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.kernels.ao import torchao

PATTERNS = ("none", "2:4")
MLP_WEIGHTS = (".mlp.w1", ".mlp.w2", ".mlp.w3")


def sparse_layer(module: nn.Module, fqn: str) -> bool:
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("layers.")
        and fqn.endswith(MLP_WEIGHTS)
        and module.in_features % 64 == 0
        and module.out_features % 64 == 0
    )


def check_sparsity(pattern: str, device: torch.device, precision: str, float8: str) -> None:
    where = f"kernels.sparsity = '{pattern}'"
    if device.type != "cuda":
        raise ConfigError(
            f"{where} runs on CUDA GPUs only (semi-structured sparse kernels exist nowhere else), "
            f"not on {device.type}; set kernels.sparsity = 'none'"
        )
    if float8 != "none":
        raise ConfigError(f"{where} and kernels.float8 = '{float8}' both replace the MLP's linear layers; choose one")
    if precision == "fp32":
        raise ConfigError(f"{where} needs train.precision = bf16 (cuSPARSELt has no float32 kernels)")
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise ConfigError(f"{where} needs an sm80+ GPU (A100, H100 ...); set kernels.sparsity = 'none'")
    torchao("sparsity.training", where)


def apply_sparsity(model: nn.Module) -> int:
    """Swap the MLP linears for a 2:4 sparse linear (torchao); returns how many."""
    training = torchao("sparsity.training", "kernels.sparsity = '2:4'")

    base: Any = training.SemiSparseLinear  # torchao's class, from a module imported at run time

    class SparseLinear(base):
        """torchao's SemiSparseLinear on the autocast dtype: the float32 master weight is cast
        before pruning, as cuSPARSELt multiplies only 16- and 8-bit values."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            weight = training.semi_structured_sparsify(self.weight.to(dtype), backend="cusparselt")
            return torch.nn.functional.linear(x.to(dtype), weight, None if self.bias is None else self.bias.to(dtype))

    chosen = {fqn: SparseLinear for fqn, m in model.named_modules() if sparse_layer(m, fqn)}
    if not chosen:
        raise ConfigError(
            "kernels.sparsity = '2:4': no MLP layer has sides that are multiples of 64; set kernels.sparsity = 'none'"
        )
    training.swap_linear_with_semi_sparse_linear(model, chosen)
    return len(chosen)
