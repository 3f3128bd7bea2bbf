"""Parallelism applied to a built model from outside, in a fixed order:
expert parallel -> tensor parallel -> activation checkpointing -> per-block compile -> FSDP2.

The model arrives on the meta device (so one larger than a device can be built), gets its
layout here, is materialised with `to_empty`, and only then is initialised, shard by shard.
What is sharded how comes from the family's `ModelSpec` (its tensor-parallel plan and its
repeated blocks); nothing here names a model's attributes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.model.init import init_parameters
from kiln.model.spec import ModelSpec
from kiln.parallel.experts import shard_experts
from kiln.parallel.mesh import ParallelDims
from kiln.parallel.plans import tensor_parallel_plan


def write_full_value(param: torch.Tensor, full: torch.Tensor) -> None:
    """Initialiser writer: keep this rank's shard of the full value (no communication)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def _checkpointed_forward(original, *args, **kwargs):
    return checkpoint(original, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(blocks: list[tuple[str, nn.Module]], mode: str) -> None:
    """Recompute block activations in backward: every block (full) or every other one (selective).
    The block's forward is wrapped in place, so parameter names do not change."""
    for i, (_, block) in enumerate(blocks):
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            block.forward = functools.partial(_checkpointed_forward, block.forward)


def apply_block_compile(blocks: list[tuple[str, nn.Module]]) -> None:
    for _, block in blocks:
        block.compile()  # in place: names and state_dict keys stay as they are


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy: under bf16, parameters are gathered in bf16 (half the all-gather bytes; the
    products run in bf16 under autocast anyway) and gradients reduced in fp32 (a sum over many
    ranks in bf16 loses precision), as torchtitan and OLMo-core configure it. Under fp32, fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    dp_mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    experts: Sequence[nn.Module] = (),
    expert_mesh: DeviceMesh | None = None,
    precision: str = "fp32",
) -> None:
    """FSDP2: shard each block, then the root (whatever is left: embeddings, final norm, head).
    Under expert parallelism the experts modules first, over the ranks holding the same experts."""
    mp = mixed_precision(precision)
    for module in experts:
        fully_shard(module, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    for i, (_, block) in enumerate(blocks):
        # the last block is resharded by the root anyway; keeping it gathered saves one all-gather
        last = i == len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward and not last, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)


def set_gradient_sync(parts: Sequence[nn.Module], last_micro_batch: bool, mode: str) -> None:
    """Before a micro-batch's backward under gradient accumulation: HSDP's all-reduce across
    replicas only on a step's last micro-batch; FSDP's reduce-scatter on every micro-batch
    (`every_microbatch`: sharded gradients, more traffic) or only on the last
    (`last_microbatch`: one reduction a step, unsharded gradients kept in between)."""
    for part in parts:
        if isinstance(part, FSDPModule):
            if mode == "last_microbatch":
                part.set_requires_gradient_sync(last_micro_batch)
            else:
                part.set_requires_all_reduce(last_micro_batch)


def parallelize(
    model: nn.Module,
    spec: ModelSpec,
    cfg: Config,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    expert_mesh: DeviceMesh | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """Apply the configured layout to `model` (on the meta device), in the fixed order."""
    blocks = spec.block_list(model)
    experts: list[nn.Module] = []
    if dims.ep > 1:
        if spec.expert_modules is None or not spec.expert_modules(model):
            raise ConfigError(f"model.family = '{spec.name}' has no experts to spread; set parallel.ep = 1")
        pairs = spec.expert_modules(model)
        assert expert_mesh is not None  # built whenever parallel.ep > 1 (Parallel.setup)
        shard_experts(pairs, expert_mesh)
        experts = [module for _, module in pairs]
    if dims.tp > 1:
        plan = tensor_parallel_plan(spec)
        if plan is None:
            raise ConfigError(f"model.family = '{spec.name}' has no tensor-parallel plan; set parallel.tp = 1")
        assert mesh is not None  # a distributed layout always has a mesh
        plan(model, mesh["tp"])
    if cfg.parallel.activation_checkpoint != "none":
        if not blocks:
            raise ConfigError(
                f"model.family = '{spec.name}' names no blocks to checkpoint; set "
                "parallel.activation_checkpoint = 'none'"
            )
        apply_activation_checkpointing(blocks, cfg.parallel.activation_checkpoint)
    if cfg.parallel.compile_blocks:
        apply_block_compile(blocks)
    if dims.dp_size > 1:
        assert mesh is not None  # a distributed layout always has a mesh
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        edp_mesh = None
        if experts:
            assert expert_mesh is not None
            edp_mesh = expert_mesh["dp_replicate", "edp"] if dims.dp_replicate > 1 else expert_mesh["edp"]
        apply_fsdp(model, blocks, dp_mesh, experts=experts, expert_mesh=edp_mesh, precision=precision)
    return model


def materialise(
    model: nn.Module, spec: ModelSpec, cfg: Config, device: torch.device, from_checkpoint: bool = False
) -> nn.Module:
    """Allocate a (meta) model's storage on `device` and initialise it, shard by shard
    (`from_checkpoint`: a checkpoint is loaded next; see `init_parameters`)."""
    model.to_empty(device=device)
    init_parameters(
        model, spec.init_rule, cfg.model, cfg.train.seed, write=write_full_value, from_checkpoint=from_checkpoint
    )
    return model
