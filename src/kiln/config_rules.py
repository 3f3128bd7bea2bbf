"""Value checks of the sections (ranges, how sections fit together, the run-policy sections:
guard, mask, faults, callbacks): part of `kiln.config.validate`, kept apart so the config module
stays its dataclasses and their loading."""

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
        stages = par.pipeline_stages
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


PARAM_KINDS = ("hidden", "embedding", "head", "norm_bias")  # kiln.train.optim_groups.parameter_kind


def named_table_label(key: str, i: int, name: str, names: list[str], used_for: str) -> str:
    """The label of table `i` of the array `key` ([[data.sources]], [[optim.groups]]) in errors;
    refuses a name that is not letters, digits, - and _ (it is `used_for`) or is used twice."""
    label = f"{key}.{name}" if name else f"{key}[{i}]"
    require(
        bool(name) and all(c.isalnum() or c in "-_" for c in name),
        f"{label}.name must be letters, digits, '-' or '_' ({used_for}), got {name!r}",
    )
    require(name not in names, f"{key} names {name!r} twice; give each its own name")
    names.append(name)
    return label


def validate_optim_groups(cfg: Any) -> None:
    """`optim.muon_*` and `[[optim.groups]]`: names, what each selects, its rule and numbers
    (which parameters a group matches is checked against the model when it is built)."""
    o = cfg.optim
    require(o.muon_lr > 0, f"optim.muon_lr must be positive, got {o.muon_lr}")
    require(0 <= o.muon_momentum < 1, f"optim.muon_momentum must be in [0, 1), got {o.muon_momentum}")
    low_bit = o.name in ("adamw8bit", "adamw4bit")
    require(
        not (low_bit and any(g.optimizer == "muon" for g in o.groups)),
        f"optim.name = {o.name!r} keeps AdamW's states in low bits, which Muon groups do not have; "
        "use optim.name = 'adamw' with the muon groups, or drop them",
    )
    names: list[str] = []
    for i, g in enumerate(o.groups):
        label = named_table_label("optim.groups", i, g.name, names, "--set optim.groups.<name>.lr=...")
        require(
            bool(g.params) != bool(g.kind),
            f"{label} needs exactly one of params (name globs) or kind ({', '.join(PARAM_KINDS)})",
        )
        require(not g.kind or g.kind in PARAM_KINDS, f"{label}.kind must be one of {', '.join(PARAM_KINDS)}")
        require(g.optimizer in ("adamw", "muon"), f"{label}.optimizer must be adamw or muon, got {g.optimizer!r}")
        require(g.lr >= 0 and g.lr_mult > 0, f"{label}: lr must be >= 0 (0 = the optimizer's) and lr_mult > 0")
        require(g.weight_decay >= 0 or g.weight_decay == -1, f"{label}.weight_decay must be >= 0 (-1 = optim's)")
        require(
            not g.betas or (len(g.betas) == 2 and all(0 <= b < 1 for b in g.betas)),
            f"{label}.betas must be [beta1, beta2], each in [0, 1), got {g.betas}",
        )
        require(
            g.optimizer != "muon" or not g.betas,
            f"{label}: betas are AdamW's; Muon takes optim.muon_momentum",
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
        label = named_table_label("data.sources", i, s.name, names, "it names metrics such as val_loss/<name>")
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


def validate_ranges(flat: dict[str, Any]) -> None:
    """Keys that must be positive or non-negative, by their flattened names."""
    positive = [
        "model.n_layers",
        "model.n_heads",
        "model.d_model",
        "model.seq_len",
        "data.vocab_size",
        "train.batch_size",
        "eval.batches",
        "log.every",
        "kernels.chunk_size",
        "model.image_size",
        "model.patch_size",
        "model.image_channels",
    ]
    for key in positive:
        require(flat[key] > 0, f"{key} must be positive, got {flat[key]}")
    non_negative = [
        "model.n_kv_heads",
        "model.d_ff",
        "model.max_seq_len",
        "model.type_vocab_size",
        "train.steps",
        "train.tokens",
        "train.batch_tokens",
        "train.micro_batch_size",
        "train.threads",
        "eval.every",
        "eval.sample_tokens",
        "checkpoint.every",
        "schedule.warmup_steps",
        "data.max_docs",
        "data.workers",
        "optim.grad_clip",
        "optim.weight_decay",
        "eval.top_k",
        "train.seed",
        "data.split_seed",
        "data.piece_chars",
        "train.time_budget_s",
        "data.loader_workers",
    ]
    for key in non_negative:
        require(flat[key] >= 0, f"{key} must be >= 0, got {flat[key]}")


def validate_relations(cfg: Any) -> None:
    """Single values with bounds of their own, and how the model, data, optimizer, batch and
    parallel sections fit together."""
    m, t, d = cfg.model, cfg.train, cfg.data
    require(bool(m.family.strip()), "model.family is empty; name a model family (e.g. decoder)")
    require(bool(t.objective.strip()), "train.objective is empty; name an objective (e.g. causal)")
    if m.max_seq_len:
        require(
            m.seq_len <= m.max_seq_len,
            f"model.seq_len = {m.seq_len} is longer than the position table model.max_seq_len = "
            f"{m.max_seq_len}; raise model.max_seq_len (or set it to 0 = seq_len)",
        )
    require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    require(cfg.train.z_loss >= 0.0, f"train.z_loss must be >= 0 (PaLM used 1e-4), got {cfg.train.z_loss}")
    require(m.init_std > 0, f"model.init_std must be positive, got {m.init_std}")
    require(m.norm_eps > 0, f"model.norm_eps must be positive, got {m.norm_eps}")
    require(
        not (m.norm_position == "post" and m.post_norm),
        "model.norm_position = 'post' already normalises after each residual add; set model.post_norm = false",
    )

    require(
        d.vocab_size >= 260 or bool(d.tokenizer),
        f"data.vocab_size = {d.vocab_size} is too small for a byte-level BPE; use at least 260",
    )
    require(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    require(
        d.tokenizer_sample_mb > 0,
        f"data.tokenizer_sample_mb must be > 0 (MB of training text for the tokenizer), got {d.tokenizer_sample_mb}",
    )
    require(bool(d.corpus.strip()), "data.corpus is empty; name a corpus (e.g. stdlib) or a path")
    validate_mixture(cfg)
    require(
        d.piece_chars == 0 or d.piece_chars >= 256,
        f"data.piece_chars must be 0 (never split documents) or at least 256, got {d.piece_chars}",
    )

    o = cfg.optim
    require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    require(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    validate_optim_groups(cfg)
    s = cfg.schedule
    require(0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    require(0.0 < s.decay_fraction <= 1.0, f"schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}")

    if t.batch_tokens:
        require(
            t.batch_tokens % m.seq_len == 0,
            f"train.batch_tokens = {t.batch_tokens} must be a multiple of model.seq_len = {m.seq_len}",
        )
    require(cfg.total_steps > 0, "train.steps (or train.tokens) must be positive")
    if t.micro_batch_size and not cfg.parallel.dp_batch_shares:  # uneven shares: checked per share when built
        require(
            cfg.global_batch % t.micro_batch_size == 0,
            f"train.micro_batch_size = {t.micro_batch_size} must divide the global batch of "
            f"{cfg.global_batch} sequences",
        )
    require(cfg.eval.temperature >= 0, "eval.temperature must be >= 0")

    par = cfg.parallel
    for key in ("dp_replicate", "tp", "ep", "pp", "pp_microbatches", "pp_stages_per_rank"):
        require(getattr(par, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(par, key)}")
    require(
        par.dp_shard == -1 or par.dp_shard >= 1,
        f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {par.dp_shard}",
    )
