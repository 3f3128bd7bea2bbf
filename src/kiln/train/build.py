"""Assembling a `Trainer` from a config: precision, objective, the model parts with their
parallel layout, optimizers, the train module, data, the guard, checkpoints and callbacks.

Reads as a recipe, top to bottom; each piece comes from the module that owns it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kiln.config import Config
from kiln.data.loader import BatchSampler, TokenWindows, eval_windows, share_windows
from kiln.data.mixture import MixturePrepared
from kiln.data.mixture_sampler import MixtureSampler
from kiln.data.multimodal.loader import MultimodalSampler, training_streams
from kiln.data.multimodal.prepare import MultimodalPrepared
from kiln.data.order import ORDER_VERSION
from kiln.data.shards import Prepared
from kiln.errors import ConfigError, DataError
from kiln.kernels import registry as kernels
from kiln.kernels.float8 import apply_float8, check_float8
from kiln.kernels.sparsity import apply_sparsity, check_sparsity
from kiln.model import mup
from kiln.model.spec import ModelSpec, padded_vocab
from kiln.objectives import build_objective
from kiln.parallel import pipeline as pp
from kiln.parallel.apply import materialise, parallelize
from kiln.parallel.runtime import Parallel
from kiln.plan.peak_memory import resolve_grad_sync
from kiln.runfolder.folder import RunFolder
from kiln.train.callbacks.base import Callback, CallbackList
from kiln.train.callbacks.builtin import builtin_callbacks, loop_parts
from kiln.train.callbacks.registry import build_callbacks
from kiln.train.checkpoint import Checkpointer
from kiln.train.guard import Guard
from kiln.train.mixture import build_mixture
from kiln.train.module import TrainModule
from kiln.train.optim import build_optimizer
from kiln.train.optim_groups import describe_groups, group_rules
from kiln.train.precision import resolve_precision
from kiln.train.seeding import dropout_seed
from kiln.train.trainer import Trainer


def _precision(cfg: Config, par: Parallel, resume_state: dict[str, Any] | None) -> str:
    saved = (resume_state or {}).get("trainer", {}).get("precision")
    if cfg.train.precision == "auto" and saved:
        return saved  # a resumed run keeps the precision "auto" chose for it
    # rank 0 decides (a CPU choice is timed), so every rank computes alike
    chosen = par.broadcast(resolve_precision(cfg, par.device) if par.is_main else None)
    assert chosen is not None  # rank 0's choice, on every rank
    return chosen


def check_kernels(cfg: Config, par: Parallel) -> None:
    """Refuse, in one line, `[kernels]` options this machine or layout cannot run."""
    k = cfg.kernels
    kernels.check_backend(k.backend, par.device)
    if k.float8 != "none":
        check_float8(k.float8, par.device, par.dims.tp)
    if k.sparsity != "none":
        check_sparsity(k.sparsity, par.device, cfg.train.precision, k.float8)


def build_parts(
    cfg: Config,
    spec: ModelSpec,
    par: Parallel,
    vocab_size: int,
    from_checkpoint: bool = False,
    precision: str = "fp32",
) -> tuple[list, list[int], int]:
    """This rank's model parts (the whole model, or its pipeline stages), laid out and initialised."""
    k = cfg.kernels
    check_kernels(cfg, par)
    kernels.set_backend(k.backend)
    ids, n_stages = pp.stage_ids(cfg, par.dims.pp, par.pp_rank) if par.dims.pp > 1 else ([0], 1)
    parts = []
    for stage in ids:
        with torch.device("meta"):
            model = spec.build(cfg.model, padded_vocab(vocab_size))
        if par.dims.pp > 1:
            model = pp.cut_stage(model, spec, stage, n_stages, cfg.parallel.pp_layers or None)
        if k.float8 != "none":  # before sharding: FSDP2 then all-gathers the float8 weights' own way
            apply_float8(model, k.float8, fsdp_all_gather=par.dims.dp_shard > 1)
        if k.sparsity != "none":
            apply_sparsity(model)
        parallelize(model, spec, cfg, par.dims, par.mesh, par.expert_mesh, precision)
        parts.append(materialise(model, spec, cfg, par.device, from_checkpoint))
    return parts, ids, n_stages


def rank_micro_batch(cfg: Config, local_batch: int) -> int:
    """Sequences per forward pass on this rank. With uneven `parallel.dp_batch_shares` every rank
    runs as many micro-batches as the largest share needs at `train.micro_batch_size` (FSDP's
    collectives pair up pass by pass), each of its own size."""
    shares = cfg.parallel.dp_batch_shares
    if not shares:
        return cfg.train.micro_batch_size or local_batch
    passes = -(-max(shares) // (cfg.train.micro_batch_size or max(shares)))
    if any(n % passes for n in shares):
        raise ConfigError(
            f"parallel.dp_batch_shares = {shares}: every share must split into the {passes} micro-batches "
            f"the largest needs at train.micro_batch_size = {cfg.train.micro_batch_size}"
        )
    return local_batch // passes


def _data_streams(
    cfg: Config,
    data: Prepared | MixturePrepared | MultimodalPrepared,
    dp_rank: int,
    dp_size: int,
    resume_state: dict[str, Any] | None,
    lineage: dict[str, Any],
) -> tuple[
    MultimodalSampler | BatchSampler | MixtureSampler,
    Any,
    dict[str, torch.Tensor],
    dict[str, tuple[torch.Tensor, float]],
]:
    """This rank's training sampler and the validation windows: (sampler, windows, the extra
    validation sets of image-text data by name, a mixture's windows and weight per source)."""
    extra_windows: dict[str, torch.Tensor] = {}
    source_windows: dict[str, tuple[torch.Tensor, float]] = {}
    sampler: MultimodalSampler | BatchSampler | MixtureSampler
    if isinstance(data, MultimodalPrepared):
        sampler, val_sets = training_streams(cfg, data, dp_rank, dp_size)
        windows, extra_windows = val_sets.pop(""), val_sets
    elif isinstance(data, MixturePrepared):
        sampler, source_windows = build_mixture(cfg, data, dp_rank, dp_size, resume_state, lineage)
        windows = next(iter(source_windows.values()))[0]  # (the encoder's fill-mask demo reads the first)
    else:
        sampler = BatchSampler(
            TokenWindows(data.split("train"), cfg.model.seq_len, "train"),
            cfg.global_batch,
            cfg.train.seed,
            dp_rank,
            dp_size,
            cfg.parallel.dp_batch_shares,
            # a run resumes in the order it was made with (checkpoints before the order was recorded: legacy)
            order=(resume_state or {}).get("trainer", {}).get("order", "legacy") if resume_state else ORDER_VERSION,
        )
        windows = eval_windows(
            TokenWindows(data.split("val"), cfg.model.seq_len, "validation"), cfg.eval.batches * cfg.global_batch
        )
    return sampler, windows, extra_windows, source_windows


def _grad_sync(cfg: Config, spec: ModelSpec, vocab_size: int, par: Parallel, precision: str) -> str:
    """When gradients are reduced across data-parallel ranks: at every micro-batch or the last."""
    # every rank must reduce at the same micro-batches: "auto" is decided for the smallest device
    grad_sync = resolve_grad_sync(cfg, spec, vocab_size, par.dims, precision, par.device)
    if par.distributed and cfg.parallel.grad_sync == "auto":
        skips = torch.tensor(float(grad_sync == "last_microbatch"), device=par.device)
        grad_sync = "last_microbatch" if par.sum(skips).item() == par.info.world_size else "every_microbatch"
    return grad_sync


def _validation_shares(
    windows: torch.Tensor,
    extra_windows: dict[str, torch.Tensor],
    source_windows: dict[str, tuple[torch.Tensor, float]],
    dp_rank: int,
    dp_size: int,
    eval_batch: int,
) -> tuple[Any, dict[str, Any], dict[str, tuple[Any, float]]]:
    """This rank's share of the validation windows (and of the extra and per-source sets), in
    multiples of the evaluation batch."""
    if len(windows) < dp_size:
        raise DataError(
            f"the validation split has {len(windows)} window(s) of model.seq_len + 1 tokens, too few "
            f"for {dp_size} data-parallel ranks; raise data.val_fraction or eval.batches"
        )
    val = share_windows(windows, dp_rank, dp_size, multiple=eval_batch)
    extra_val = {name: share_windows(w, dp_rank, dp_size, multiple=eval_batch) for name, w in extra_windows.items()}
    source_val = {
        name: (share_windows(w, dp_rank, dp_size, multiple=eval_batch), weight)
        for name, (w, weight) in source_windows.items()
    }
    return val, extra_val, source_val


def _checkpointer(cfg: Config, run: RunFolder, par: Parallel) -> Checkpointer:
    """The run's checkpointer, with `[checkpoint]`'s retention and `parallel.async_checkpoint`."""
    return Checkpointer(
        run.checkpoints,
        par,
        keep=cfg.checkpoint.keep,
        keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.parallel.async_checkpoint,
    )


def _attach_schedule(cfg: Config, module: TrainModule, local_batch: int) -> None:
    """Give the train module its pipeline schedule, once the per-rank batch is known to split into
    `parallel.pp_microbatches`."""
    n_micro = cfg.parallel.pp_microbatches
    if local_batch % n_micro:
        raise ConfigError(
            f"parallel.pp_microbatches = {n_micro} must divide the per-rank batch of "
            f"{local_batch} sequences (train.batch_size / data-parallel ranks)"
        )
    module.attach_schedule()


def _optimizer_groups(cfg: Config, spec: ModelSpec, vocab_size: int) -> list[dict[str, Any]]:
    """`[[optim.groups]]` (or Muon's default split) checked against the whole model, built on the
    meta device (a pipeline stage holds part of it): every parameter in one group, no table that
    selects nothing. [] for plain AdamW."""
    rules = group_rules(cfg.optim, mup=mup.is_mup(cfg.model))
    if not rules:
        return []
    with torch.device("meta"):
        model = spec.build(cfg.model, padded_vocab(vocab_size))
    return describe_groups(rules, model, mup.width_mult(cfg.model))


def build_trainer(
    cfg: Config,
    spec: ModelSpec,
    run: RunFolder,
    data: Prepared | MixturePrepared | MultimodalPrepared,
    par: Parallel,
    resume_state: dict[str, Any] | None = None,
    callbacks: Iterable[Callback] = (),
) -> Trainer:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dp_rank, dp_size = par.dp
    torch.manual_seed(dropout_seed(cfg.train.seed, dp_rank))  # weights have generators of their own
    precision = _precision(cfg, par, resume_state)
    objective = build_objective(cfg, data.tokenizer, data.vocab_size)

    described = _optimizer_groups(cfg, spec, data.vocab_size)
    parts, stage_ids, n_stages = build_parts(
        cfg, spec, par, data.vocab_size, from_checkpoint=resume_state is not None, precision=precision
    )
    width = mup.width_mult(cfg.model) if mup.is_mup(cfg.model) else None
    optimizers = [build_optimizer(p, cfg.optim, par.device, width) for p in parts]
    lineage = run.lineage() or {}  # a fork: batch ranges to skip, parameters its parent's checkpoint lacks, its mix
    sampler, windows, extra_windows, source_windows = _data_streams(cfg, data, dp_rank, dp_size, resume_state, lineage)
    micro_batch = rank_micro_batch(cfg, sampler.local_batch)
    grad_sync = _grad_sync(cfg, spec, data.vocab_size, par, precision)
    module = TrainModule(cfg, par, parts, optimizers, objective, precision, micro_batch, stage_ids, n_stages, grad_sync)
    module.optimizer_groups = described
    # The same on every rank (uneven training shares too): evaluation forwards must pair up under
    # FSDP. With shares, the smallest rank's micro-batch: it fits the device with the least memory.
    shares = cfg.parallel.dp_batch_shares
    eval_batch = rank_micro_batch(cfg, min(shares)) if shares else micro_batch
    if par.dims.pp > 1:
        _attach_schedule(cfg, module, sampler.local_batch)
        eval_batch = sampler.local_batch  # the schedule's shapes are the training step's
    val, extra_val, source_val = _validation_shares(
        windows, extra_windows, source_windows, dp_rank, dp_size, eval_batch
    )

    guard = Guard(cfg.guard, par.device, judge_from=cfg.schedule.warmup_steps) if cfg.guard.enabled else None
    checkpointer = _checkpointer(cfg, run, par)
    evaluation, checkpoints = loop_parts(cfg)
    listed = CallbackList([*builtin_callbacks(cfg), *build_callbacks(cfg.callbacks), *callbacks])
    return Trainer(
        cfg,
        spec,
        run,
        data,
        par,
        module,
        sampler,
        val,
        eval_batch,
        listed,
        checkpointer,
        guard,
        evaluation,
        checkpoints,
        skipped=[list(r) for r in lineage.get("skip_batches", [])],
        new_tensors=tuple(lineage.get("new_tensors", [])),
        extra_val=extra_val,
        source_val=source_val,
    )
