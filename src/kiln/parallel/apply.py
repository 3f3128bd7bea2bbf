"""Parallelism applied to a built model from outside, in a fixed order:
tensor parallel -> activation checkpointing -> per-block compile -> FSDP2.

The model arrives on the meta device (so one larger than a device can be built), gets its
layout here, is materialised with `to_empty`, and only then is initialised, shard by shard.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

from kiln.config import Config
from kiln.model.init import init_parameters
from kiln.parallel.mesh import ParallelDims


def write_full_value(param: torch.Tensor, full: torch.Tensor) -> None:
    """Initialiser writer: keep this rank's shard of the full value (no communication)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism: norms and dropout see 1/tp of the sequence,
    attention and MLP projections are split column-wise then row-wise."""
    top: dict[str, object] = {}
    if model.tok_emb is not None:
        top["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        if model.pos_emb is not None:
            top["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
        top["head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.w1": ColwiseParallel(),
            "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        if hasattr(block.mlp, "w3"):
            plan["mlp.w3"] = ColwiseParallel()
        if block.attn.q_norm is not None:
            # q/k norms act per head on local heads: their weights are replicated on the TP mesh.
            plan["attn.q_norm"] = _replicated()
            plan["attn.k_norm"] = _replicated()
        parallelize_module(block, tp_mesh, plan)


def _replicated():
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateParams(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
            for name, p in list(module.named_parameters(recurse=False)):
                module.register_parameter(name, nn.Parameter(distribute_tensor(p, mesh, [Replicate()]),
                                                             requires_grad=p.requires_grad))
            return module

    return ReplicateParams()


def _checkpointed_forward(original, *args, **kwargs):
    return checkpoint(original, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute block activations in backward: every block (full) or every other one (selective).
    The block's forward is wrapped in place, so parameter names do not change."""
    for i, (name, block) in enumerate(model.layers.items()):
        if mode == "full" or (mode == "selective" and int(name) % 2 == 0):
            block.forward = functools.partial(_checkpointed_forward, block.forward)


def apply_block_compile(model: nn.Module) -> None:
    for block in model.layers.values():
        block.compile()  # in place: names and state_dict keys stay as they are


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True) -> None:
    """FSDP2: shard each block, then the root (embeddings, final norm, head)."""
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block is resharded by the root anyway; keeping it gathered saves one all-gather
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)


def parallelize(model: nn.Module, cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None) -> nn.Module:
    """Apply the configured layout to `model` (on the meta device), in the fixed order."""
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if cfg.parallel.activation_checkpoint != "none":
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
    if cfg.parallel.compile_blocks:
        apply_block_compile(model)
    if dims.dp_size > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh)
    return model


def materialise(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Allocate a (meta) model's storage on `device` and initialise it, shard by shard."""
    model.to_empty(device=device)
    init_parameters(model, cfg.model, cfg.train.seed, write=write_full_value)
    return model
