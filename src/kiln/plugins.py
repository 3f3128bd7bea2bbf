"""One plugin mechanism: user code that registers callbacks, evaluation suites, corpora, model
families or objectives, loaded before a verb resolves any name.

    kiln <verb> --plugin my_parts.py --plugin my_package.kiln_parts ...
    KILN_PLUGINS=my_package.kiln_parts,/path/to/more.py kiln train ...

A plugin is a `.py` file or an importable module; importing it runs its `@register_*`
decorators. `--suite-file` and `KILN_SUITES` are older names for the same thing and keep
working. Each plugin is imported once per process, however often it is named.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from kiln.errors import KilnError

ENV_VARS = ("KILN_PLUGINS", "KILN_SUITES")
_loaded: dict[str, str] = {}  # what the user named -> the module it became


def _is_path(item: str) -> bool:
    return item.endswith(".py") or os.sep in item or "/" in item


def _load_file(path: Path) -> str:
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise KilnError(f"plugin file '{path}' does not exist")
    name = "kiln_plugin_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return name
    spec = importlib.util.spec_from_file_location(name, resolved)
    assert spec is not None and spec.loader is not None  # a .py file always gets a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return name


def load_plugin(item: str) -> str:
    """Import one plugin (a .py path or a module name); returns its module name."""
    item = item.strip()
    if item in _loaded:
        return _loaded[item]
    if _is_path(item):
        name = _load_file(Path(item))
    else:
        try:
            importlib.import_module(item)
        except ModuleNotFoundError as e:
            raise KilnError(
                f"plugin '{item}' cannot be imported ({e}); give a module on PYTHONPATH or a .py path"
            ) from None
        name = item
    _loaded[item] = name
    return name


def env_plugins() -> list[str]:
    items: list[str] = []
    for var in ENV_VARS:
        items += [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]
    return items


def load_plugins(items: Iterable[str] = ()) -> list[str]:
    """Import the plugins named on the command line and in the environment, in that order of
    appearance (the environment's first); returns what was named."""
    named = list(dict.fromkeys([*env_plugins(), *items]))
    for item in named:
        try:
            load_plugin(item)
        except KilnError as e:
            source = next((v for v in ENV_VARS if item in os.environ.get(v, "")), None)
            raise KilnError(f"{source}: {e}" if source else str(e)) from None
    return named


def loaded_plugins() -> list[str]:
    return list(_loaded)
