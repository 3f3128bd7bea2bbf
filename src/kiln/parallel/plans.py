"""Tensor-parallel plans by name: a family's `ModelSpec.tensor_parallel` names one of `PLANS`
(the model imports nothing from here) or is a plan itself (a plugin's), and `kiln.parallel.apply`
calls it.

The transformer plan is Megatron-style with sequence parallelism: norms and dropout see 1/tp of
the sequence, attention and MLP projections are split column-wise then row-wise. A feed-forward
block that is not a pair of linear layers (a mixture of experts) is not split: every tp rank runs
it whole on the whole (all-gathered) sequence and keeps its own chunk of the output; its weights
are replicated over the tp ranks and their gradients come out whole on each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from kiln.errors import ConfigError

if TYPE_CHECKING:
    from kiln.model.layers import Attention
    from kiln.model.spec import ModelSpec


class HeadNorm(ParallelStyle):
    """A per-head norm (QK-norm) on this rank's heads: its gain is replicated over the
    tensor-parallel mesh, and its input, a local tensor of heads (B, heads, T, head_dim), is
    seen as sharded on the heads dimension, so the gain's gradient is summed over all heads."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(
                name, nn.Parameter(distribute_tensor(p, mesh, [Replicate()]), requires_grad=p.requires_grad)
            )
        module.register_forward_pre_hook(lambda _, args: (DTensor.from_local(args[0], mesh, [Shard(1)]),))
        module.register_forward_hook(lambda _, args, out: out.to_local())
        return module


def transformer_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    top: dict[str, ParallelStyle] = {}
    if model.tok_emb is not None:
        top["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        if model.pos_emb is not None:
            top["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
        top["head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, top)
    for block in cast(nn.ModuleDict, model.layers).values():
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
        }
        if isinstance(getattr(block.mlp, "w1", None), nn.Linear):  # a dense MLP: split column- then row-wise
            plan.update(
                {
                    "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                    "mlp.w1": ColwiseParallel(),
                    "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
                }
            )
            if hasattr(block.mlp, "w3"):
                plan["mlp.w3"] = ColwiseParallel()
        else:  # any other feed-forward (a mixture of experts) runs whole on every tp rank, on the whole sequence
            plan["mlp"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(Shard(1),),
                use_local_output=True,
            )
        if block.attn_post_norm is not None:  # the sub-layers' outputs are sequence-sharded (Shard(1))
            plan["attn_post_norm"] = SequenceParallel(use_local_output=True)  # the residual stream is local
            plan["mlp_post_norm"] = SequenceParallel(use_local_output=True)
        if cast("Attention", block.attn).q_norm is not None:
            plan["attn.q_norm"] = HeadNorm()
            plan["attn.k_norm"] = HeadNorm()
        parallelize_module(block, tp_mesh, plan)


PLANS: dict[str, Callable[[nn.Module, DeviceMesh], None]] = {"transformer": transformer_tensor_parallel}


def tensor_parallel_plan(spec: ModelSpec) -> Callable[[nn.Module, DeviceMesh], None] | None:
    """The plan `spec.tensor_parallel` gives or names (None: the family has no tensor parallelism)."""
    plan = spec.tensor_parallel
    if not isinstance(plan, str):
        return plan
    if plan not in PLANS:
        raise ConfigError(
            f"model.family = '{spec.name}' names tensor-parallel plan {plan!r}; known plans: {', '.join(PLANS)}"
        )
    return PLANS[plan]
