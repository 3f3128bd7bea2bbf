"""2:4 semi-structured sparsity in training (`kernels.sparsity = "2:4"`, torchao, CUDA only).

The MLPs' linear weights are pruned at run time to two non-zeros in every four (the largest two
by magnitude, recomputed each step from the dense weights, which keep learning) and multiplied by
cuSPARSELt's sparse kernels: up to ~2x on those products on sm80+ GPUs. Attention projections stay
dense, as in torchao's recipe. No CPU kernel exists, so elsewhere it is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.kernels.ao import torchao

PATTERNS = ("none", "2:4")
MLP_WEIGHTS = (".mlp.w1", ".mlp.w2", ".mlp.w3")


def sparse_layer(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("layers.") and fqn.endswith(MLP_WEIGHTS) \
        and module.in_features % 64 == 0 and module.out_features % 64 == 0


def check_sparsity(pattern: str, device: torch.device) -> None:
    where = f"kernels.sparsity = '{pattern}'"
    if device.type != "cuda":
        raise ConfigError(f"{where} runs on CUDA GPUs only (semi-structured sparse kernels exist nowhere else), "
                          f"not on {device.type}; set kernels.sparsity = 'none'")
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise ConfigError(f"{where} needs an sm80+ GPU (A100, H100 ...); set kernels.sparsity = 'none'")
    torchao("sparsity.training", where)


def apply_sparsity(model: nn.Module) -> int:
    """Swap the MLP linears for torchao's SemiSparseLinear; returns how many."""
    training = torchao("sparsity.training", "kernels.sparsity = '2:4'")
    chosen = {fqn: training.SemiSparseLinear for fqn, m in model.named_modules() if sparse_layer(m, fqn)}
    training.swap_linear_with_semi_sparse_linear(model, chosen)
    return len(chosen)
