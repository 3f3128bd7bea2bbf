"""Writing configs as TOML (the standard library reads TOML but does not write it)."""

from __future__ import annotations

from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:  # TOML basic strings: escape backslash, quote and every control character
            if ch in ('"', "\\"):
                out.append("\\" + ch)
            elif ord(ch) < 0x20 and ch != "\t" or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: entries of an array of tables ([[data.sources]])
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml_table(name: str, values: dict[str, Any], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict))
    lines.append("")
    for k, v in values.items():
        if isinstance(v, dict):
            _toml_table(f"{name}.{_toml_key(k)}", v, lines)


def toml_text(data: dict[str, Any]) -> str:
    """Sections of values (and nested option tables) as TOML, readable by tomllib."""
    lines: list[str] = []
    for section, values in data.items():
        _toml_table(section, values, lines)
    return "\n".join(lines)
