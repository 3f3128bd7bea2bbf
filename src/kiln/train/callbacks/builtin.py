"""The callbacks every run has, built from the config's own sections (not `[callbacks]`):
the loop's built-in behaviour, each in the module that implements it."""

from __future__ import annotations

from kiln.config import Config
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


def builtin_callbacks(cfg: Config) -> list[Callback]:
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
