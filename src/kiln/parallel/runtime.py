"""The running job's parallel context: process info, degrees, mesh, device, and the few
collectives the trainer needs (sums over ranks, agreement on errors, gradient-norm clipping).

A single process gets the same object with every degree 1 and no mesh, so the trainer has one
code path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from kiln.config import Config
from kiln.errors import KilnError
from kiln.parallel.mesh import ParallelDims, ProcessInfo, dp_coordinates, init_process_group, process_info

T = TypeVar("T")


@dataclass
class Parallel:
    info: ProcessInfo
    dims: ParallelDims
    mesh: DeviceMesh | None
    device: torch.device
    collective_timer: Callable[[Callable[[], T]], T] | None = None  # set by the loop for callbacks' around_collective
    expert_mesh: DeviceMesh | None = None  # parallel.ep > 1: ("pp", "dp_replicate", "edp", "ep", "tp")

    @classmethod
    def setup(cls, cfg: Config, device: torch.device) -> Parallel:
        info = process_info()
        dims = ParallelDims.from_config(cfg.parallel, info.world_size)  # on every rank, before any collective
        init_process_group(info, timeout_s=cfg.guard.collective_timeout_s)
        if device.type == "cuda" and info.world_size > 1:
            device = torch.device("cuda", torch.cuda.current_device())
        mesh = dims.build_mesh(device.type) if dims.distributed else None
        expert_mesh = dims.build_expert_mesh(device.type) if dims.ep > 1 else None
        return cls(info, dims, mesh, device, expert_mesh=expert_mesh)

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    @property
    def distributed(self) -> bool:
        return self.dims.distributed

    @property
    def dp(self) -> tuple[int, int]:
        return dp_coordinates(self.mesh, self.dims)

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp") if self.mesh is not None else 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _timed(self, fn: Callable[[], T]) -> T:
        return fn() if self.collective_timer is None else self.collective_timer(fn)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank (callers divide out the copies that TP and PP make)."""
        if self.distributed:
            t = t.clone()
            self._timed(lambda: dist.all_reduce(t))
        return t

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks of this rank's pipeline stage and tp position only
        (for per-stage quantities such as a stage's MoE routing counts)."""
        if not self.distributed:
            return t
        assert self.mesh is not None  # built for every distributed job
        t = t.clone()
        for dim in ("dp_shard", "dp_replicate"):
            if getattr(self.dims, dim) > 1:
                group = self.mesh.get_group(dim)
                self._timed(functools.partial(dist.all_reduce, t, group=group))
        return t

    def data_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a per-data-parallel-rank quantity that the tp ranks of a group hold identically
        and that only the last pipeline stage holds (others pass zeros)."""
        return self.sum(t) / self.dims.tp

    def broadcast(self, obj: T) -> T:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 while the others wait; a user error there is raised on every rank
        (so a bad input ends every process with the same message instead of a hang)."""
        if not self.distributed:
            return fn()
        result, error, failure = None, None, None
        if self.is_main:
            try:
                result = fn()
            except KilnError as e:
                failure, error = e, str(e)
        error = self.broadcast(error)
        if failure is not None:
            raise failure  # rank 0 keeps the precise error type (DataError, ConfigError, ...)
        if error is not None:
            raise KilnError(error)
        return result

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Global gradient norm over all shards and stages; clip to `max_norm` (inf = no clip)."""
        groups: dict[object, list[torch.Tensor]] = {}  # by mesh: expert weights live on a mesh of their own
        for p in params:
            if p.grad is not None:
                groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)

        def total() -> torch.Tensor:
            # The norm of sharded (DTensor) gradients reduces over the shards of FSDP and TP, partly
            # inside get_total_norm already: the whole of it counts as communication.
            norms = []
            for group in groups.values():
                norm = torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None], foreach=True)
                norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
            if len(norms) == 1:
                return norms[0]
            return torch.stack(norms).pow(2).sum().sqrt() if norms else torch.zeros((), device=self.device)

        norm = self._timed(total) if self.distributed else total()
        if self.dims.pp > 1:
            assert self.mesh is not None  # pp > 1 is distributed
            mesh, sq = self.mesh, norm.pow(2)
            self._timed(lambda: dist.all_reduce(sq, group=mesh["pp"].get_group()))
            norm = sq.sqrt()
        if max_norm != float("inf"):
            for group in groups.values():
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
        return norm

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
