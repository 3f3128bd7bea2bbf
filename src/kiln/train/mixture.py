"""A run's mixture sampler, built from the config and what the run recorded: the eras of its mix
(kiln.data.mixture_order.Era) live in every checkpoint's trainer state, and a fork that changed
the weights records its parent's eras plus the new one in lineage.json."""

from __future__ import annotations

from typing import Any

from kiln.config import Config
from kiln.data.loader import TokenWindows, eval_windows
from kiln.data.mixture import MixturePrepared
from kiln.data.mixture_order import MIX_VERSION, Era, MixtureSchedule, era_from_config, mixture_fingerprint
from kiln.data.mixture_sampler import MixtureSampler
from kiln.errors import CheckpointError, DataError

FORK_HINT = "fork it to change the mix: kiln fork RUN --step N --name NEW --set data.sources.<name>.weight=W"


def mixture_eras(cfg: Config, resume_state: dict[str, Any] | None, lineage: dict[str, Any]) -> list[Era]:
    """The eras the run's sampler follows: the config's mix for a new run; the checkpoint's
    record on resume (refused if the mix was changed since); a fork's lineage at its first start."""
    fingerprint = mixture_fingerprint(cfg.data)
    if resume_state is None:
        return [era_from_config(cfg.data, cfg.total_steps)]
    fork = lineage.get("mixture")
    if fork and resume_state.get("step") == lineage.get("parent", {}).get("step"):  # the fork's first start
        recorded = fork
    else:
        recorded = resume_state.get("trainer", {}).get("mixture")
    if not recorded:
        raise CheckpointError(
            f"the checkpoint records no mixture, but the config now has [[data.sources]]; {FORK_HINT}"
        )
    if recorded["fingerprint"] != fingerprint:
        raise CheckpointError(
            "data.sources / data.stages differ from the mix the checkpoint was trained with (weights, "
            f"max_epochs or stages); resuming with another mix is refused: {FORK_HINT}"
        )
    return [Era.from_json(e) for e in recorded["eras"]]


def mixture_state(cfg: Config, eras: list[Era]) -> dict[str, Any]:
    """What a checkpoint records of the mix."""
    return {"version": MIX_VERSION, "fingerprint": mixture_fingerprint(cfg.data), "eras": [e.to_json() for e in eras]}


def build_mixture(
    cfg: Config,
    data: MixturePrepared,
    rank: int,
    world: int,
    resume_state: dict[str, Any] | None,
    lineage: dict[str, Any],
) -> tuple[MixtureSampler, dict[str, tuple[Any, float]]]:
    """The sampler, and each source's validation windows with its weight (val_loss/<source>)."""
    seq = cfg.model.seq_len
    trains = [TokenWindows(s.prepared.split("train"), seq, f"source {s.name!r} train") for s in data.sources]
    eras = mixture_eras(cfg, resume_state, lineage)
    schedule = MixtureSchedule(eras, [len(w) for w in trains], cfg.global_batch, cfg.train.seed, data.names)
    if schedule.end is not None and schedule.end < cfg.total_steps:
        raise DataError(
            f"every source of the mixture reaches its max_epochs by step {schedule.end}, before the run's "
            f"{cfg.total_steps} steps; raise data.sources.<name>.max_epochs (0 = no limit) or train fewer steps"
        )
    sampler = MixtureSampler(
        trains, schedule, cfg.global_batch, cfg.train.seed, rank, world, cfg.parallel.dp_batch_shares
    )
    sampler.state = mixture_state(cfg, eras)
    n = cfg.eval.batches * cfg.global_batch  # per source: each loss is measured on as many windows as one set
    vals = {
        s.name: (
            eval_windows(TokenWindows(s.prepared.split("val"), seq, f"source {s.name!r} validation"), n),
            s.weight,
        )
        for s in data.sources
    }
    return sampler, vals
