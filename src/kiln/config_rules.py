"""Value checks of the run-policy sections (guard, mask, faults, callbacks): part of
`kiln.config.validate`, kept apart so the config module stays one screenful of dataclasses."""

from __future__ import annotations

import math
from typing import Any

from kiln.errors import ConfigError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_sections(cfg: Any) -> None:
    g = cfg.guard
    for key in ("window", "min_history", "max_interventions"):
        require(getattr(g, key) >= 1, f"guard.{key} must be >= 1, got {getattr(g, key)}")
    require(g.min_history <= g.window, f"guard.min_history = {g.min_history} must be <= guard.window = {g.window}")
    require(g.k > 0, f"guard.k must be positive, got {g.k}")
    require(
        0 < g.k_corroborated <= g.k,
        f"guard.k_corroborated = {g.k_corroborated} must be positive and at most guard.k = {g.k}",
    )
    for key in ("min_loss_jump", "min_grad_jump"):
        require(getattr(g, key) >= 1, f"guard.{key} must be >= 1 (a ratio to the median), got {getattr(g, key)}")
    require(g.persist >= 2, f"guard.persist must be >= 2, got {g.persist}")
    require(g.lr_factor > 0, f"guard.lr_factor must be positive, got {g.lr_factor}")
    for key in ("margin", "lr_factor_steps", "hang_min_s"):
        require(getattr(g, key) >= 0, f"guard.{key} must be >= 0, got {getattr(g, key)}")
    require(g.hang_factor > 1, f"guard.hang_factor must be > 1, got {g.hang_factor}")
    require(g.collective_timeout_s > 0, f"guard.collective_timeout_s must be positive, got {g.collective_timeout_s}")
    require(cfg.checkpoint.keep >= 0 and cfg.checkpoint.keep_every >= 0, "checkpoint.keep and keep_every must be >= 0")

    par = cfg.parallel
    if par.dp_batch_shares:
        shares = par.dp_batch_shares
        require(all(n >= 1 for n in shares), f"parallel.dp_batch_shares must be positive, got {shares}")
        require(
            sum(shares) == cfg.global_batch,
            f"parallel.dp_batch_shares = {shares} add up to {sum(shares)}, not "
            f"the global batch of {cfg.global_batch} sequences",
        )
        require(
            par.pp == 1,
            "parallel.dp_batch_shares works with parallel.pp = 1 (give stages uneven layers with "
            "parallel.pp_layers instead)",
        )
        require(
            not cfg.debug.invariants,
            "debug.invariants compares equal-sized data shares; it does not support parallel.dp_batch_shares yet",
        )
    if par.pp_layers:
        stages = par.pp * (par.pp_stages_per_rank if par.pp_schedule == "interleaved-1f1b" else 1)
        require(
            len(par.pp_layers) == stages,
            f"parallel.pp_layers names {len(par.pp_layers)} stages; the pipeline has {stages}",
        )
        require(
            all(n >= 1 for n in par.pp_layers) and sum(par.pp_layers) == cfg.model.n_layers,
            f"parallel.pp_layers = {par.pp_layers} must be positive and add up to model.n_layers = "
            f"{cfg.model.n_layers}",
        )

    k = cfg.mask
    require(0.0 < k.rate < 1.0, f"mask.rate must be in (0, 1), got {k.rate}")
    for key in ("replace", "random", "keep"):
        require(0.0 <= getattr(k, key) <= 1.0, f"mask.{key} must be in [0, 1], got {getattr(k, key)}")
    require(
        abs(k.replace + k.random + k.keep - 1.0) < 1e-6,
        f"mask.replace + mask.random + mask.keep must add up to 1, got {k.replace} + {k.random} + {k.keep} = "
        f"{k.replace + k.random + k.keep:g}",
    )
    require(cfg.debug.invariants_every >= 1, f"debug.invariants_every must be >= 1, got {cfg.debug.invariants_every}")
    f = cfg.faults
    for key in ("lr_high_factor", "lr_low_factor", "dead_fraction"):
        require(getattr(f, key) > 0, f"faults.{key} must be positive, got {getattr(f, key)}")
    require(f.dead_fraction <= 1, f"faults.dead_fraction must be <= 1, got {f.dead_fraction}")
    require(
        0 <= f.layer < cfg.model.n_layers, f"faults.layer = {f.layer} must name a layer (0..{cfg.model.n_layers - 1})"
    )
    require(
        f.throttle_factor >= 1, f"faults.throttle_factor must be >= 1 (how many times slower), got {f.throttle_factor}"
    )
    for key in ("slow_s", "slow_rank_s", "hang_s", "stall_s"):
        require(getattr(f, key) >= 0, f"faults.{key} must be >= 0, got {getattr(f, key)}")
    for name in cfg.callbacks.enabled:
        require(bool(name.strip()), "callbacks.enabled holds an empty name")
    require(
        len(set(cfg.callbacks.enabled)) == len(cfg.callbacks.enabled),
        f"callbacks.enabled names a callback twice: {cfg.callbacks.enabled}",
    )


def validate_mixture(cfg: Any) -> None:
    """`[[data.sources]]` and `[[data.stages]]`: names, weights and stage starts (the corpora
    themselves are read, and refused when empty, by `kiln prepare`)."""
    d = cfg.data
    if not d.sources:
        require(not d.stages, "data.stages schedules the weights of [[data.sources]]; the config defines none")
        return
    require(
        cfg.train.objective != "multimodal",
        "[[data.sources]] mixes text corpora; image-text data (train.objective = 'multimodal') takes data.corpus",
    )
    names: list[str] = []
    for i, s in enumerate(d.sources):
        label = f"data.sources.{s.name}" if s.name else f"data.sources[{i}]"
        require(
            bool(s.name) and all(c.isalnum() or c in "-_" for c in s.name),
            f"{label}.name must be letters, digits, '-' or '_' (it names metrics such as val_loss/<name>), "
            f"got {s.name!r}",
        )
        require(s.name not in names, f"data.sources names {s.name!r} twice; give each source its own name")
        names.append(s.name)
        require(bool(s.corpus.strip()), f"{label}.corpus is empty; name a corpus (e.g. stdlib) or a path")
        require(math.isfinite(s.weight) and s.weight >= 0, f"{label}.weight must be >= 0, got {s.weight}")
        require(
            math.isfinite(s.max_epochs) and s.max_epochs >= 0,
            f"{label}.max_epochs must be >= 0 (0 = no limit), got {s.max_epochs}",
        )
    total = sum(s.weight for s in d.sources)
    require(total > 0, "the weights of data.sources sum to 0; give at least one source a positive weight")
    starts: list[tuple[float, str]] = []
    for i, st in enumerate(d.stages):
        label = f"data.stages[{i}]"
        by_step, by_fraction = st.start >= 0, st.start_fraction >= 0
        require(
            by_step != by_fraction,
            f"{label} needs exactly one of start (a step) or start_fraction (of the run's steps, in [0, 1))",
        )
        require(by_step or st.start_fraction < 1, f"{label}.start_fraction must be in [0, 1), got {st.start_fraction}")
        unknown = sorted(set(st.weights) - set(names))
        if unknown:
            raise ConfigError(
                f"{label}.weights names {unknown[0]!r}, which is not a source (sources: {', '.join(names)})"
            )
        for name, w in st.weights.items():
            require(math.isfinite(w) and w >= 0, f"{label}.weights.{name} must be >= 0, got {w}")
        require(sum(st.weights.values()) > 0, f"{label}.weights sum to 0; give at least one source a positive weight")
        start = float(st.start) if by_step else st.start_fraction * cfg.total_steps
        if starts and start <= starts[-1][0]:
            raise ConfigError(
                f"{label} starts at step {start:g}, not after the stage before it ({starts[-1][1]}); "
                "list stages in order"
            )
        starts.append((start, f"step {start:g}"))
