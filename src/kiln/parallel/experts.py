"""Expert parallelism for mixture-of-experts blocks, applied from outside like the other layouts.

`parallel.ep` splits each FSDP (dp_shard) group into `edp x ep`: the ep ranks of a group hold
different experts (E / ep each) and exchange tokens; the edp ranks holding the same experts shard
them with FSDP2. Every rank still reads its own data, as a data-parallel rank does.

    router (local) -> rows sorted by expert -> all_to_all_single: rows to the ranks of their experts
      -> local experts (grouped products) -> all_to_all_single back -> weighted sum (local)

Dropless, the exchange sizes are uneven and may be zero; they are exchanged first (one small
all-to-all of counts, read on the host: the one sync a step needs per MoE layer), then the rows.
With a capacity factor every expert gets exactly `capacity` slots (zeros where empty), so the
sizes are known and nothing is read on the host (`fixed`). Gradients flow back through the same
exchange reversed.

Expert weights become DTensors sharded on dimension 0 over the "ep" mesh dimension, so any
checkpoint names them by their full shape and a distributed checkpoint reloads into another
expert-parallel degree. Their gradients: every rank multiplies its loss by the data-parallel size
(FSDP averages over it), but an expert's gradient already sums the tokens of all ep ranks through
the exchange, and its FSDP group (edp x dp_replicate) averages over dp_size / ep ranks only; so
the experts scale their weights' gradients by 1 / ep (`GroupedExperts.grad_scale`). (FSDP2's
`set_gradient_divide_factor` would do it too, but as a pre-multiplied reduce-scatter, which gloo
lacks.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from kiln.syncs import note_host_read

if TYPE_CHECKING:
    from kiln.model.moe import GroupedExperts, MoEFeedForward


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class ExpertParallelDispatch:
    """`MoEFeedForward.dispatch` under expert parallelism: rows (sorted by global expert,
    `counts[e]` for expert e) go to the ep rank holding their expert and come back in order."""

    def __init__(self, mesh: DeviceMesh):
        self.group = mesh.get_group("ep")
        self.ep = mesh["ep"].size()

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, moe: MoEFeedForward) -> torch.Tensor:
        per_rank = counts.numel() // self.ep
        send = counts.view(self.ep, per_rank).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[src, e]: rows from src for local expert e
        # The one host sync of a dropless exchange: all_to_all_single takes its split sizes as numbers.
        send_splits, recv_splits = torch.stack([send.sum(1), recv.sum(1)]).tolist()
        note_host_read()
        rows = _AllToAll.apply(x, recv_splits, send_splits, self.group)
        # received source-major, expert-minor: regroup by local expert for the grouped products
        local_expert = torch.repeat_interleave(
            torch.arange(per_rank, device=x.device).repeat(self.ep), recv.flatten(), output_size=sum(recv_splits)
        )
        order = local_expert.argsort(stable=True)
        y_sorted = moe.experts(rows[order], recv.sum(0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _AllToAll.apply(y_sorted[inverse], send_splits, recv_splits, self.group)

    def fixed(self, x: torch.Tensor, capacity: int, moe: MoEFeedForward) -> torch.Tensor:
        """Capacity slots (E x capacity rows, expert-major) to their experts' ranks and back: every
        split is (E / ep) x capacity rows, known without asking the device."""
        per_rank = x.shape[0] // (self.ep * capacity)  # local experts
        splits = [per_rank * capacity] * self.ep
        rows = _AllToAll.apply(x, splits, splits, self.group)  # (source, local expert, slot)
        d = x.shape[1]
        by_expert = rows.view(self.ep, per_rank, capacity, d).transpose(0, 1).reshape(-1, d)
        counts = torch.full((per_rank,), self.ep * capacity, dtype=torch.long, device=x.device)
        y = moe.experts(by_expert, counts)
        back = y.view(per_rank, self.ep, capacity, d).transpose(0, 1).reshape(-1, d)
        return _AllToAll.apply(back, splits, splits, self.group)


def shard_experts(experts: list[tuple[nn.Module, nn.Module]], mesh: DeviceMesh) -> None:
    """For each (MoE block, its experts module): the expert weights as DTensors sharded on dim 0
    over mesh["ep"], and the block's dispatch through the token exchange."""
    ep_mesh = mesh["ep"]
    dispatch = ExpertParallelDispatch(mesh)
    for block, module in cast("list[tuple[MoEFeedForward, GroupedExperts]]", experts):  # the spec's pairs
        for name, param in list(module.named_parameters(recurse=False)):
            if param.shape[0] % ep_mesh.size():
                raise ValueError(f"{name}: {param.shape[0]} experts do not split over ep = {ep_mesh.size()}")
            sharded = nn.Parameter(distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None))
            setattr(module, name, sharded)
        block.dispatch = dispatch
        module.grad_scale = 1.0 / ep_mesh.size()
