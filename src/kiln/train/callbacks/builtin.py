"""The core set every run has, built from the config's own sections (not `[callbacks]`): the
loop's own parts (evaluation, checkpoints) and the built-in callbacks, each in its module."""

from __future__ import annotations

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.train.callbacks.base import Callback
from kiln.train.callbacks.budget import TimeBudget
from kiln.train.callbacks.faults import Faults, any_fault
from kiln.train.callbacks.hang_watchdog import HangWatchdog
from kiln.train.callbacks.invariants import Invariants
from kiln.train.callbacks.logging import ConsoleLog, MetricsLog
from kiln.train.callbacks.mixture import MixtureEvents
from kiln.train.callbacks.plot import LossPlot
from kiln.train.callbacks.routing import RoutingStats
from kiln.train.callbacks.samples import Samples
from kiln.train.callbacks.status import RunStatus
from kiln.train.callbacks.throughput import Throughput
from kiln.train.checkpoint_policy import CheckpointPolicy
from kiln.train.evaluation import Evaluation

# Core callbacks a config may leave out with `callbacks.disabled`; the others keep what every run
# must have (its records, its status, the guard's faults and budget decisions, the mix's events).
DISABLEABLE = ("evaluation", "checkpoints", "samples", "throughput", "console", "plot")


def loop_parts(cfg: Config) -> tuple[Evaluation | None, CheckpointPolicy | None]:
    """The loop's evaluation and checkpoint policy, None where `callbacks.disabled` names it."""
    check_disabled(cfg)
    disabled = cfg.callbacks.disabled
    return (
        None if Evaluation.name in disabled else Evaluation(),
        None if CheckpointPolicy.name in disabled else CheckpointPolicy(),
    )


def check_disabled(cfg: Config) -> None:
    """`callbacks.disabled` names only core parts that may go (checked before anything is written)."""
    for name in cfg.callbacks.disabled:
        if name not in DISABLEABLE:
            raise ConfigError(
                f"callbacks.disabled: '{name}' is not a core callback that can be left out; those are "
                f"{', '.join(DISABLEABLE)} (the run's records, status and guard stay on)"
            )
        if name in cfg.callbacks.enabled:
            raise ConfigError(f"callbacks.enabled and callbacks.disabled both name '{name}'; keep one")


def builtin_callbacks(cfg: Config) -> list[Callback]:
    """The core callbacks, less `callbacks.disabled`."""
    check_disabled(cfg)
    return [cb for cb in _core(cfg) if cb.name not in cfg.callbacks.disabled]


def _core(cfg: Config) -> list[Callback]:
    callbacks: list[Callback] = [
        Samples(),
        Throughput(),
        ConsoleLog(),
        MetricsLog(),
        RunStatus(),
    ]
    if cfg.train.time_budget_s:
        callbacks.append(TimeBudget())
    if cfg.guard.hang_min_s > 0:
        callbacks.append(HangWatchdog())
    if cfg.log.plot:
        callbacks.append(LossPlot())
    if cfg.debug.invariants and "invariants" not in cfg.callbacks.enabled:
        callbacks.append(Invariants())  # every debug.invariants_every steps
    if cfg.model.moe.experts:
        callbacks.append(RoutingStats())
    if cfg.data.sources:
        callbacks.append(MixtureEvents())
    if any_fault(cfg.faults):
        callbacks.append(Faults(cfg.faults))
    return callbacks
