"""The one object that owns the parallel degrees, checks them and builds the named DeviceMesh.

Mesh dimensions, outermost first: ("pp", "dp_replicate", "dp_shard", "tp"). Tensor parallelism
is innermost so its frequent collectives stay between neighbouring ranks (inside a node).
Nothing else in Kiln reads WORLD_SIZE or RANK.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from kiln.config import ParallelConfig
from kiln.errors import ConfigError

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1  # expert parallel: a subdivision of dp_shard (dp_shard = edp x ep)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        fixed = cfg.dp_replicate * cfg.tp * cfg.pp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(
                    f"parallel.dp_replicate x tp x pp = {cfg.dp_replicate} x {cfg.tp} x {cfg.pp} = "
                    f"{fixed} does not divide the world size {world_size}"
                )
            dp_shard = world_size // fixed
        dims = cls(cfg.dp_replicate, dp_shard, cfg.tp, cfg.pp, world_size, cfg.ep)
        product = dims.dp_replicate * dims.dp_shard * dims.tp * dims.pp
        if product != world_size:
            raise ConfigError(
                f"parallel degrees dp_replicate x dp_shard x tp x pp = {dims.dp_replicate} x "
                f"{dims.dp_shard} x {dims.tp} x {dims.pp} = {product}, but the world size is "
                f"{world_size}; make them multiply to {world_size} (dp_shard = -1 fills the rest)"
            )
        if dims.dp_shard % dims.ep:
            # gcd(ep, dp_shard) divides ep, so it divides the experts too: always a valid choice
            fits = math.gcd(dims.ep, dims.dp_shard)
            raise ConfigError(
                f"parallel.ep = {dims.ep} must divide parallel.dp_shard = {dims.dp_shard} at world size "
                f"{world_size} (expert parallelism splits each FSDP group's experts among its ranks); add "
                f"--set parallel.ep={fits} (a distributed checkpoint reloads at any parallel.ep)"
            )
        return dims

    @property
    def edp(self) -> int:
        """Ranks of a dp_shard group that hold the same experts (FSDP of the expert weights)."""
        return self.dp_shard // self.ep

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (
            " x ".join(f"{n}={getattr(self, n)}" for n in (*DIM_NAMES, "ep") if getattr(self, n) > 1)
            or "single process"
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The named mesh, built from process groups created here with `new_group`.

        (`init_device_mesh` would be shorter, but its groups could not be re-created after a
        torchrun elastic restart on gloo: the restarted job hung. Groups made by `new_group`
        restart cleanly.)"""
        shape = tuple(getattr(self, n) for n in DIM_NAMES)
        return _mesh_of_new_groups(torch.arange(self.world_size).view(shape), DIM_NAMES, device_type)

    def build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """The mesh of the expert weights: dp_shard split into ("edp", "ep"), ep innermost so a
        token exchange stays among neighbouring ranks. Ranks are those of `build_mesh`."""
        names = ("pp", "dp_replicate", "edp", "ep", "tp")
        shape = (self.pp, self.dp_replicate, self.edp, self.ep, self.tp)
        return _mesh_of_new_groups(torch.arange(self.world_size).view(shape), names, device_type)


def _mesh_of_new_groups(ranks: torch.Tensor, names: tuple[str, ...], device_type: str) -> DeviceMesh:
    me = dist.get_rank()
    mine = []
    for dim in range(ranks.dim()):
        # every rank creates every group of this dimension, in the same order
        for line in ranks.movedim(dim, -1).reshape(-1, ranks.shape[dim]).tolist():
            group = dist.new_group(line)
            if me in line:
                mine.append(group)
    return DeviceMesh.from_group(mine, device_type, mesh=ranks, mesh_dim_names=names)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int


def process_info() -> ProcessInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    return ProcessInfo(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


# On GPUs one process group with two backends: NCCL for CUDA tensors, gloo for CPU ones. NCCL has
# no CPU backend, so a plain "nccl" group fails on every collective over a CPU tensor (the
# checkpoint writers' agreement flags, object collectives); with both, each tensor goes to the
# backend of its device.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def backend_for(cuda: bool) -> str:
    return GPU_BACKEND if cuda else "gloo"


def init_process_group(info: ProcessInfo, timeout_s: float = 600.0) -> None:
    """NCCL (plus gloo for CPU tensors) on GPUs, gloo on CPU; no-op for a single process."""
    if info.world_size == 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    backend = backend_for(cuda)
    timeout = timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and "MASTER_ADDR" in os.environ:
        # Under torchrun, keep each restart attempt's keys apart: otherwise a restarted job can
        # read the addresses the previous attempt's dead processes published, and hang.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            info.world_size,
            is_master=not agent_store and info.rank == 0,
            timeout=timeout,
        )
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"kiln/attempt-{restart}", store),
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )
    else:
        dist.init_process_group(backend, timeout=timeout)


def dp_coordinates(mesh: DeviceMesh | None, dims: ParallelDims) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): which slice of each global batch this rank reads."""
    if mesh is None:
        return 0, 1
    rep = mesh.get_local_rank("dp_replicate")
    shard = mesh.get_local_rank("dp_shard")
    return rep * dims.dp_shard + shard, dims.dp_size
