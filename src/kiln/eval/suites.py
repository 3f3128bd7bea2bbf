"""Evaluation suites by name.

A suite is a function (or a class whose instances are called) taking an `EvalContext` and
returning a flat dict of numbers, or a `SuiteResult` with metrics, artifacts to save for
inspection, or the reason it was skipped. Register one with a decorator:

    from kiln.eval.suites import register_suite

    @register_suite("my-suite", options={"items": 100})
    def my_suite(ctx):
        ...                      # ctx.model, ctx.tokenizer, ctx.data, ctx.options["items"], ...
        return {"score": 0.5}

Built-in suites live one per module in `kiln/eval/` (lm, continuation, choice, bias, toxicity,
memorisation). A user's suites come from a plugin (`--plugin my_suites.py`, `KILN_PLUGINS`; the
older `--suite-file` and `KILN_SUITES` are the same), so their decorators run.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import Config, coerce, parse_value
from kiln.errors import ConfigError, KilnError

BUILTIN_MODULES = ("lm", "continuation", "choice", "bias", "toxicity", "memorisation")


@dataclass
class SuiteResult:
    metrics: Mapping[str, float | int | None] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # saved as eval/step-N/<suite>.json
    skipped: str | None = None  # why the suite did not run (e.g. it needs generation)


@dataclass
class Suite:
    name: str
    fn: Callable[[EvalContext], dict[str, Any] | SuiteResult]
    options: dict[str, Any]  # defaults; `kiln eval --option name.key=value` overrides them
    generates: bool  # needs generation: skipped for encoder models
    help: str


SUITES: dict[str, Suite] = {}


def register_suite(
    name: str, options: dict[str, Any] | None = None, generates: bool = False, help: str | None = None
) -> Callable:
    """Decorator: register a suite under `name`. `options` are its settings and their defaults;
    `generates=True` marks a suite that samples text (skipped for encoders)."""

    def wrap(obj: Callable) -> Callable:
        fn: Callable[[EvalContext], dict[str, Any] | SuiteResult] = obj
        if isinstance(obj, type):  # a class of suites: its instance is the suite (inspect.isclass's test)
            fn = obj()
        doc = help or (inspect.getdoc(obj) or "").split("\n")[0]
        SUITES[name] = Suite(name, fn, dict(options or {}), generates, doc)
        return obj

    return wrap


@dataclass
class EvalContext:
    """Everything a suite may need. `data` is prepared lazily (cached shards are reused)."""

    cfg: Config
    model: nn.Module
    tokenizer: Any  # kiln.data.tokenizer.KilnTokenizer
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    run_dir: Path | None = None
    step: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # this suite's options (defaults filled in)
    prepared: Any = None  # kiln.data.shards.Prepared, or None to prepare on first use
    seed: int | None = None  # None = train.seed

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = self.cfg.train.seed

    @property
    def data(self):
        if self.prepared is None:
            from kiln.data.dataset import prepare_data
            from kiln.progress import console, quiet

            self.prepared = prepare_data(self.cfg, log=lambda s: None if quiet() else console.print(s))
        return self.prepared

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self.cfg.model.seq_len

    @property
    def batch_size(self) -> int:
        """Sequences per forward pass: the training micro-batch, at most 64, and few enough that
        the (batch, seq_len, vocab) logits stay near 2**27 numbers."""
        cap = max(1, 2**27 // (self.seq_len * self.vocab_size))
        return max(1, min(self.cfg.train.micro_batch_size or self.cfg.global_batch, 64, cap))

    @property
    def is_encoder(self) -> bool:
        """A bidirectional family (its spec says so), or one trained to fill masks."""
        from kiln.model.registry import get_spec

        return not get_spec(self.cfg.model.family).causal or self.cfg.train.objective == "masked"


# --------------------------------------------------------------------------- the registry

_loaded_builtins = False


def load_suite_file(path: str | Path) -> None:
    """Import a .py file of the user's so its `@register_suite` decorators run (the same as
    `--plugin`)."""
    from kiln.plugins import load_plugin

    load_plugin(str(path))


def available_suites() -> dict[str, Suite]:
    """Every registered suite: the built-ins, then those of loaded plugins (kiln.plugins)."""
    global _loaded_builtins
    if not _loaded_builtins:
        for mod in BUILTIN_MODULES:
            importlib.import_module(f"kiln.eval.{mod}")
        _loaded_builtins = True
    builtin = {n: SUITES[n] for n in BUILTIN_MODULES if n in SUITES}  # in a fixed order, then the rest
    return {**builtin, **{n: s for n, s in SUITES.items() if n not in builtin}}


def check_suite_names(names: list[str], where: str = "eval.suites") -> None:
    """ConfigError naming any unknown suite (used when validating `[eval] suites`)."""
    known = available_suites()
    for n in names:
        if n not in known:
            raise ConfigError(
                f"{where}: unknown suite '{n}'; registered suites: {', '.join(known)} "
                "(add your own with @register_suite in a --plugin file, or KILN_PLUGINS / "
                "KILN_SUITES)"
            )


def check_suites(names: list[str], where: str = "eval.suites") -> None:
    """`check_suite_names` once the user's plugins (--plugin, KILN_PLUGINS, KILN_SUITES) have
    registered theirs."""
    from kiln.plugins import load_plugins

    load_plugins()
    check_suite_names(names, where)


def parse_options(items: list[str], suites: dict[str, Suite]) -> dict[str, dict[str, Any]]:
    """`suite.key=value` strings (values read as TOML, else as plain strings) -> per-suite options,
    checked against each suite's declared options and their types."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        suite, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise KilnError(f"--option '{item}': expected SUITE.KEY=VALUE, e.g. --option choice.tasks=hellaswag.jsonl")
        if suite not in suites:
            raise KilnError(f"--option '{item}': unknown suite '{suite}'; registered suites: {', '.join(suites)}")
        allowed = suites[suite].options
        if name not in allowed:
            listed = ", ".join(f"{suite}.{k}" for k in allowed) or "none"
            raise KilnError(f"--option '{item}': suite '{suite}' has no option '{name}'; its options: {listed}")
        out.setdefault(suite, {})[name] = _coerce_option(f"{suite}.{name}", parse_value(raw), allowed[name])
    return out


def _coerce_option(key: str, value: Any, default: Any) -> Any:
    """`value` as the type of the option's default (lists of strings stay lists of strings)."""
    kind = type(default)
    if isinstance(default, list):
        value = value if isinstance(value, list) else [value]
        return [str(v) for v in value]
    if kind is str:
        return str(value)
    try:
        return coerce(f"--option {key}", value, kind)
    except ConfigError as e:
        raise KilnError(str(e)) from None


def describe_suites() -> str:
    """One line per suite with its options, for `kiln eval --help`."""
    lines = []
    for s in available_suites().values():
        opts = ", ".join(f"{k}={json.dumps(v)}" for k, v in s.options.items())
        lines.append(f"  {s.name:<13} {s.help}" + (f" [options: {opts}]" if opts else ""))
    return "\n".join(lines)
