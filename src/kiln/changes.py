"""Which config changes a run survives: `--resume` (how it is optimised, evaluated, saved,
logged, guarded, monitored and laid out) and `kiln fork` (those, plus the stabilisers added after
an instability). Everything else defines the run."""

from __future__ import annotations

from typing import Any

from kiln.config import Config, flatten
from kiln.errors import ConfigError

# What may change when a run is resumed: how it is optimised, evaluated, saved, logged, guarded,
# monitored and laid out. Everything else (model shape, data, tokenizer, seed, batch) defines the run.
RESUMABLE_SECTIONS = (
    "optim",
    "schedule",
    "eval",
    "checkpoint",
    "log",
    "guard",
    "parallel",
    "callbacks",
    "debug",
    "faults",
    "kernels",
)
RESUMABLE_KEYS = (
    "train.steps",
    "train.tokens",
    "train.time_budget_s",
    "train.compile",
    "train.threads",
    "train.micro_batch_size",
    "train.precision",
    "train.device",
    "train.tf32",
    "train.deterministic",
    "data.cache_dir",
    "data.workers",
    "data.loader_workers",
)


# What a fork may change on top of that: the stabilisers researchers reach for after an
# instability (new tensors they add, QK-norm and post-norm gains, start as documented: gains 1),
# and how a mixture of experts is balanced (no tensor changes).
FORKABLE_KEYS = (
    "model.dropout",
    "model.qk_norm",
    "model.post_norm",
    "train.z_loss",
    "model.moe_aux_loss",
    "model.moe_seq_aux_loss",
    "model.moe_z_loss",
    "model.moe_bias_rate",
    "model.moe_capacity_factor",
)


MIX_KEYS = ("data.sources", "data.stages")  # a fork may change the mix (weights, limits, stages), not its corpora


def mix_change_only(key: str, old: Any, new: Any) -> bool:
    """True if `key` is part of the mix and the change keeps every source's name, corpus and text
    field (in order): only weights, max_epochs and stages differ."""
    if key == "data.stages":
        return True
    if key != "data.sources" or not isinstance(old, list) or not isinstance(new, list) or len(old) != len(new):
        return False
    fixed = ("name", "corpus", "text_field")
    return all(all(a.get(f) == b.get(f) for f in fixed) for a, b in zip(old, new))


def changed_keys(saved: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Every flattened key whose value differs: {key: (old, new)}."""
    old_flat, new_flat = flatten(saved), flatten(new)
    return {k: (old_flat.get(k), v) for k, v in new_flat.items() if v != old_flat.get(k)}


OPTIMIZER_LAYOUT = ("name", "params", "kind", "optimizer")  # what an optimizer group's saved state depends on


def optimizer_layout_change(key: str, old: Any, new: Any) -> str:
    """Why a change of `key` would not fit the optimizer state a checkpoint holds ("" if it
    does): another optimizer (AdamW and Muon keep different state), or groups that select other
    parameters. Learning rates, weight decay and betas may change."""
    if key == "optim.name" and (old == "muon") != (new == "muon"):
        return f"optim.name {old!r} -> {new!r} changes the optimizer and its state"
    if key == "optim.groups":
        layout = [[g.get(f) for f in OPTIMIZER_LAYOUT] for g in old or []]
        if layout != [[g.get(f) for f in OPTIMIZER_LAYOUT] for g in new or []]:
            return "optim.groups select other parameters or optimizers than the checkpoint's state was built for"
    return ""


def resumable(key: str) -> bool:
    return key.split(".")[0] in RESUMABLE_SECTIONS or key in RESUMABLE_KEYS


def check_resume_changes(saved: Config, new: Config) -> None:
    """Refuse a resume whose config changes what the run is, naming the key and what may change."""
    for key, (old, value) in changed_keys(saved, new).items():
        why = optimizer_layout_change(key, old, value)
        if why:
            raise ConfigError(
                f"{why}; on --resume and in a fork only a group's lr, lr_mult, weight_decay and betas may "
                "change (start a new run, or kiln fork --from-scratch, for another optimizer layout)"
            )
        if not resumable(key):
            if mix_change_only(key, old, value):
                raise ConfigError(
                    f"{key} cannot change on --resume: the mix (weights, max_epochs, stages) is part of the run; "
                    "fork it to change the mix from a checkpoint on: kiln fork RUN --step N --name NEW "
                    "--set data.sources.<name>.weight=W"
                )
            hint = (
                "; fork the run to change it (kiln fork RUN --step N --name NEW --set ...)"
                if key in FORKABLE_KEYS
                else "; start a new run (or fork --from-scratch) to change it"
            )
            raise ConfigError(
                f"{key} cannot change on --resume ({old!r} -> {value!r}): it defines the run; "
                f"allowed changes: the {', '.join(RESUMABLE_SECTIONS)} sections and "
                f"{', '.join(RESUMABLE_KEYS)}{hint}"
            )
