"""Callbacks by name: `[callbacks] enabled = ["layer_stats", ...]` selects them and
`[callbacks.<name>]` tables give their options (checked against each callback's `Options`
dataclass). Built in: the monitoring callbacks below; a plugin adds its own with
`@register_callback("name")` on a `Callback` subclass.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable

from kiln.config import CallbacksConfig, build_dataclass
from kiln.errors import ConfigError
from kiln.train.callbacks.base import Callback
from kiln.train.callbacks.invariants import Invariants
from kiln.train.callbacks.layer_stats import LayerStats
from kiln.train.callbacks.memory_timeline import MemoryMonitor
from kiln.train.callbacks.profiler import Profiler
from kiln.train.callbacks.step_time import StepTime
from kiln.train.callbacks.writers import TensorBoardWriter, WandbWriter

CALLBACKS: dict[str, type[Callback]] = {
    cls.name: cls for cls in (LayerStats, Profiler, MemoryMonitor, StepTime, TensorBoardWriter, WandbWriter, Invariants)
}


def register_callback(name: str) -> Callable[[type[Callback]], type[Callback]]:
    """Class decorator: make `[callbacks] enabled = [name]` select this `Callback` subclass.
    Its options, if any, are a dataclass in the class attribute `Options`."""

    def wrap(cls: type[Callback]) -> type[Callback]:
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise TypeError(f"@register_callback({name!r}) decorates a Callback subclass, got {cls!r}")
        cls.name = name
        CALLBACKS[name] = cls
        return cls

    return wrap


def _unknown(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(CALLBACKS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"{where}: unknown callback '{name}'{hint}; registered callbacks: {', '.join(CALLBACKS)} "
        "(add your own with @register_callback in a --plugin file)"
    )


def callback_options(cls: type[Callback], table: dict) -> object | None:
    """The callback's options from its `[callbacks.<name>]` table (types and values checked)."""
    if cls.Options is None:
        if table:
            raise ConfigError(f"callback '{cls.name}' takes no options, got [callbacks.{cls.name}] {', '.join(table)}")
        return None
    options = build_dataclass(cls.Options, table, f"callbacks.{cls.name}")
    check = getattr(options, "check", None)
    if check is not None:
        check()
    return options


def check_callback_config(cfg: CallbacksConfig) -> None:
    for name in cfg.enabled:
        if name not in CALLBACKS:
            raise _unknown(name, "callbacks.enabled")
    for name, table in cfg.options.items():
        if name not in CALLBACKS:
            raise _unknown(name, f"[callbacks.{name}]")
        callback_options(CALLBACKS[name], table)


def build_callbacks(cfg: CallbacksConfig) -> list[Callback]:
    """Instances of the enabled callbacks, in the order named."""
    check_callback_config(cfg)
    return [CALLBACKS[n](callback_options(CALLBACKS[n], cfg.options.get(n, {}))) for n in cfg.enabled]


def describe_callbacks() -> str:
    lines = []
    for name, cls in CALLBACKS.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        opts = ""
        if cls.Options is not None:
            opts = ", ".join(f"{f.name}={_default(f)!r}" for f in dataclasses.fields(cls.Options))
        lines.append(f"  {name:<12} {doc}" + (f" [options: {opts}]" if opts else ""))
    return "\n".join(lines)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
