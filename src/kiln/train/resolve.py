"""Resolve the names a training config gives against the registries, after plugins have loaded.

`kiln.config` checks types and values only. What a name refers to (the model family and its
own shape rules, the objective and the model it trains, evaluation suites, callbacks and their
options) is checked here, once the user's plugins (`--plugin`, `KILN_PLUGINS`, `KILN_SUITES`)
have registered theirs. Verbs check only what they use: `kiln export` needs the model family,
not the suites a run was evaluated with: `kiln export` calls `kiln.model.registry.resolve_family`
and `kiln eval` `kiln.eval.suites.check_suites` directly.
"""

from __future__ import annotations

from pathlib import Path

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.eval.suites import check_suites
from kiln.model.registry import resolve_family
from kiln.model.spec import ModelSpec
from kiln.plugins import load_plugins


def check_model(cfg: Config) -> ModelSpec:
    """The model family's spec, after its own validation of the config."""
    return resolve_family(cfg)


def check_objective(cfg: Config, spec: ModelSpec) -> None:
    from kiln.objectives import get_objective

    objective = get_objective(cfg.train.objective)
    if objective.family is not None and spec.name != objective.family:
        raise ConfigError(
            f"train.objective = '{objective.name}' trains model.family = '{objective.family}' (its "
            f"batches carry images), not '{spec.name}'"
        )
    if objective.causal is True and not spec.causal:
        raise ConfigError(
            f"train.objective = '{objective.name}' needs model.family = 'decoder' or another causal "
            f"family (model.family = '{spec.name}' sees the future); use train.objective = 'masked' "
            "for an encoder"
        )
    if objective.causal is False and spec.causal:
        raise ConfigError(
            f"train.objective = '{objective.name}' needs model.family = 'encoder' or another "
            f"bidirectional family (a causal model such as '{spec.name}' cannot see the tokens right "
            "of a mask); set model.family = 'encoder'"
        )


def check_callbacks(cfg: Config) -> None:
    from kiln.train.callbacks.registry import check_callback_config

    load_plugins()
    check_callback_config(cfg.callbacks)


def check_starting_weights(cfg: Config, spec: ModelSpec) -> None:
    """Files only step 0 reads (`model.init_from`, and the family's own: a frozen image encoder's
    `model.image_encoder_from`): a fresh start needs them; a resume, an evaluation or an export
    takes the weights from a checkpoint."""
    files = {"model.init_from": cfg.model.init_from, **spec.start_files(cfg.model)}
    for key, path in files.items():
        if path and not Path(path).is_file():
            raise ConfigError(f"{key} = '{path}' does not exist")


def check_training(cfg: Config, fresh: bool = True) -> ModelSpec:
    """Everything a training run names: family, objective, suites, callbacks; for a `fresh` start
    (no checkpoint to resume from) the files its initial weights come from."""
    spec = check_model(cfg)
    if fresh:
        check_starting_weights(cfg, spec)
    check_objective(cfg, spec)
    if cfg.eval.suites:
        check_suites(cfg.eval.suites)
    check_callbacks(cfg)
    return spec
