"""Pipeline parallelism with `torch.distributed.pipelining`: cut the model into stages by
layer, give each pipeline rank its stage(s), and drive them with a schedule.

How a model is cut is its family's business (`ModelSpec.pipeline_stage`): for the transformer a
stage is the same model class with the blocks it does not own deleted (names unchanged, so
checkpoints stay layout-independent), the embeddings only on the first stage and the final norm
and head only on the last.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.model.spec import ModelSpec
from kiln.parallel.runtime import Parallel

SCHEDULES = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved-1f1b": "ScheduleInterleaved1F1B"}


def stage_ids(cfg: Config, pp: int, pp_rank: int) -> tuple[list[int], int]:
    """(stage indices held by this rank, total number of stages); interleaved ranks hold stages
    pp_rank, pp_rank + pp, ... (the looped assignment the interleaved schedule expects)."""
    per_rank = cfg.parallel.stages_per_rank
    return [pp_rank + k * pp for k in range(per_rank)], pp * per_rank


def cut_stage(
    model: nn.Module, spec: ModelSpec, stage: int, n_stages: int, layers: list[int] | None = None
) -> nn.Module:
    """Keep only stage `stage`'s share of `model` (built on the meta device), as the family's
    spec cuts it; `layers` gives each stage's number of layers (`parallel.pp_layers`)."""
    if spec.pipeline_stage is None:
        raise ConfigError(f"model.family = '{spec.name}' cannot be cut into pipeline stages; set parallel.pp = 1")
    if layers:
        return spec.pipeline_stage(model, stage, n_stages, layers)
    return spec.pipeline_stage(model, stage, n_stages)


def build_schedule(
    parts: list[nn.Module],
    ids: list[int],
    n_stages: int,
    par: Parallel,
    cfg: Config,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    # Imported here, not at the top: torch.distributed.pipelining (with the dynamo it loads) adds
    # about 0.7 s to the start of every `kiln train`, and only pipeline runs use it.
    from torch.distributed import pipelining

    assert par.mesh is not None  # pp > 1 is distributed
    group = par.mesh["pp"].get_group()
    stages = [pipelining.PipelineStage(part, i, n_stages, par.device, group=group) for part, i in zip(parts, ids)]
    cls = getattr(pipelining, SCHEDULES[cfg.parallel.pp_schedule])
    n_micro = cfg.parallel.pp_microbatches
    # The loss is already divided by the global token count: the schedule must not rescale it.
    if cls is pipelining.ScheduleInterleaved1F1B:
        return cls(stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)  # type: ignore[arg-type]  # torch types it list[_PipelineStageBase] (invariant); each is one
    return cls(stages[0], n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)


def has_first_stage(ids: list[int]) -> bool:
    return 0 in ids


def has_last_stage(ids: list[int], n_stages: int) -> bool:
    return n_stages - 1 in ids
