"""Tensor-parallel plans, one per model family that supports tensor parallelism; a family's
`ModelSpec.tensor_parallel` points at its plan, and `kiln.parallel.apply` calls it.

The transformer plan is Megatron-style with sequence parallelism: norms and dropout see 1/tp of
the sequence, attention and MLP projections are split column-wise then row-wise.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


class ReplicateParams(ParallelStyle):
    """Parameters replicated over the tensor-parallel mesh (small per-head weights)."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(distribute_tensor(p, mesh, [Replicate()]),
                                                         requires_grad=p.requires_grad))
        return module


def transformer_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
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
            plan["attn.q_norm"] = ReplicateParams()
            plan["attn.k_norm"] = ReplicateParams()
        parallelize_module(block, tp_mesh, plan)
