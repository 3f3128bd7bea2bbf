"""The callbacks every run has, built from the config's own sections (not `[callbacks]`):
the loop's built-in behaviour, each in the module that implements it."""

from __future__ import annotations

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.train.callbacks.base import Callback
from kiln.train.callbacks.budget import TimeBudget
from kiln.train.callbacks.checkpointing import CheckpointPolicy
from kiln.train.callbacks.evaluation import Evaluation, Samples
from kiln.train.callbacks.faults import Faults, any_fault
from kiln.train.callbacks.invariants import Invariants
from kiln.train.callbacks.logging import ConsoleLog, MetricsLog
from kiln.train.callbacks.mixture import MixtureEvents
from kiln.train.callbacks.plot import LossPlot
from kiln.train.callbacks.routing import RoutingStats
from kiln.train.callbacks.status import RunStatus
from kiln.train.callbacks.throughput import Throughput
from kiln.train.callbacks.watchdog import HangWatchdog

# Core callbacks a config may leave out with `callbacks.disabled`; the others keep what every run
# must have (its records, its status, the guard's faults and budget decisions, the mix's events).
DISABLEABLE = ("evaluation", "checkpoints", "samples", "throughput", "console", "plot")


def builtin_callbacks(cfg: Config) -> list[Callback]:
    """The core set, less `callbacks.disabled` (checked here, before anything is written)."""
    for name in cfg.callbacks.disabled:
        if name not in DISABLEABLE:
            raise ConfigError(
                f"callbacks.disabled: '{name}' is not a core callback that can be left out; those are "
                f"{', '.join(DISABLEABLE)} (the run's records, status and guard stay on)"
            )
        if name in cfg.callbacks.enabled:
            raise ConfigError(f"callbacks.enabled and callbacks.disabled both name '{name}'; keep one")
    return [cb for cb in _core(cfg) if cb.name not in cfg.callbacks.disabled]


def _core(cfg: Config) -> list[Callback]:
    callbacks: list[Callback] = [
        Evaluation(),
        CheckpointPolicy(),
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
    if cfg.model.moe_experts:
        callbacks.append(RoutingStats())
    if cfg.data.sources:
        callbacks.append(MixtureEvents())
    if any_fault(cfg.faults):
        callbacks.append(Faults(cfg.faults))
    return callbacks
