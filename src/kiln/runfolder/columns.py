"""A JSONL log read column by column: one float64 array and one kind code per key, so tools that
look at a million logged steps do arithmetic on arrays instead of a million dicts.

Every value keeps what a reader of the records would see: its kind (int, float, bool, absent,
or anything else: strings, lists, objects, null, which stay out of the numeric array and are
kept sparsely by row), and NaN and the infinities as they were written. An int too large for a
float64 is a number at float precision in the array and kept exactly beside it. A key that first appears
late reads as absent in the rows before it. `parse_lines` reads like RunFolder.read_jsonl: a line
that is not a JSON object ends the log, and nothing after it counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ABSENT, INT, FLOAT, BOOL, OTHER, BIGINT = 0, 1, 2, 3, 4, 5  # kind codes (uint8)
EXACT = 2**53  # ints beyond this do not survive float64: BIGINT, the exact value kept with the others
MISSING: Any = object()  # `Table.value` of a key a row does not have

Loader = Callable[[str], tuple[np.ndarray, np.ndarray]]


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int, bool]:
    """The records of the complete lines of `data` (up to its last newline): (records, bytes of
    `data` they came from, broken). `broken`: a line that is not a JSON object ended the reading;
    the bytes counted stop before it."""
    end = data.rfind(b"\n") + 1
    if end == 0:
        return [], 0, False
    lines = data[:end].split(b"\n")
    lines.pop()  # what follows the last newline: nothing
    try:  # one call for the whole chunk: the decoder's per-call cost dominates short lines
        records = json.loads(b"[" + b",".join(lines) + b"]")
        if len(records) == len(lines) and all(type(r) is dict for r in records):
            return records, end, False
    except (ValueError, RecursionError):
        pass
    records, used = [], 0
    for line in lines:  # find the line that is not an object
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return records, used, True
        if type(record) is not dict:
            return records, used, True
        records.append(record)
        used += len(line) + 1
    return records, used, False


def parse_tail(data: bytes) -> dict[str, Any] | None:
    """The last line of a log when it lacks its newline: a record if it parses whole (a file
    written without a final newline), None for a line still being written."""
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return record if type(record) is dict else None


@dataclass
class Chunk:
    """Columns of some records: per key (in order of first appearance) values and kinds, and
    the values that are not numbers by row."""

    rows: int
    keys: list[str] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    kinds: dict[str, np.ndarray] = field(default_factory=dict)
    others: dict[str, dict[int, Any]] = field(default_factory=dict)


def _kind_of(v: Any) -> int:
    t = type(v)
    if t is float:
        return FLOAT
    if t is int:
        return INT if -EXACT <= v <= EXACT else BIGINT
    if t is bool:
        return BOOL
    return OTHER


def _column(values: list[Any]) -> tuple[np.ndarray, np.ndarray, dict[int, Any]]:
    n = len(values)
    types = set(map(type, values))
    if types == {float}:  # the common cases, done in C
        return np.array(values, np.float64), np.full(n, FLOAT, np.uint8), {}
    if types == {int}:
        try:
            ints = np.array(values, np.int64)
        except OverflowError:
            ints = None
        if ints is not None and bool(((ints >= -EXACT) & (ints <= EXACT)).all()):
            return ints.astype(np.float64), np.full(n, INT, np.uint8), {}
    out = np.full(n, np.nan)
    kinds = np.zeros(n, np.uint8)
    others: dict[int, Any] = {}
    for i, v in enumerate(values):
        if v is MISSING:
            continue
        kind = _kind_of(v)
        kinds[i] = kind
        if kind in (OTHER, BIGINT):
            others[i] = v
        if kind != OTHER:
            out[i] = float(v)
    return out, kinds, others


def columns_of(records: list[dict[str, Any]]) -> Chunk:
    """The records as columns."""
    chunk = Chunk(len(records))
    if not records:
        return chunk
    keys = list(records[0])
    try:  # every record has the first one's keys, and no other (the usual log)
        rows = [[r[k] for r in records] for k in keys]
        same = sum(map(len, records)) == len(keys) * len(records)
    except KeyError:
        same = False
    if not same:
        keys = list(dict.fromkeys(k for r in records for k in r))
        rows = [[r.get(k, MISSING) for r in records] for k in keys]
    for key, values in zip(keys, rows):
        chunk.values[key], chunk.kinds[key], others = _column(values)
        if others:
            chunk.others[key] = others
    chunk.keys = keys
    return chunk


def merge(chunks: list[Chunk]) -> Chunk:
    """One chunk of the rows of `chunks`, in order (their arrays are let go as each key is done)."""
    if len(chunks) == 1:
        return chunks[0]
    out = Chunk(sum(c.rows for c in chunks), list(dict.fromkeys(k for c in chunks for k in c.keys)))
    for key in out.keys:
        values = [c.values.pop(key, None) for c in chunks]
        kinds = [c.kinds.pop(key, None) for c in chunks]
        out.values[key] = np.concatenate(
            [v if v is not None else np.full(c.rows, np.nan) for v, c in zip(values, chunks)]
        )
        out.kinds[key] = np.concatenate(
            [k if k is not None else np.zeros(c.rows, np.uint8) for k, c in zip(kinds, chunks)]
        )
    offset = 0
    for c in chunks:
        for key, rows in c.others.items():
            out.others.setdefault(key, {}).update({offset + i: v for i, v in rows.items()})
        offset += c.rows
    return out


def _number_of(value: float, kind: int) -> Any:
    if kind == INT:
        return int(value)
    if kind == BOOL:
        return bool(value)
    return float(value)


class Table:
    """Rows of a JSONL log, by column. Columns are loaded when first asked for (a long log
    keeps several on disk that a tool never reads)."""

    def __init__(self, rows: int, keys: Iterable[str], loader: Loader, others: dict[str, dict[int, Any]]):
        self.rows = rows
        self.keys = list(keys)
        self._loader = loader
        self._others = others
        self._loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._missing: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._derived_cache: dict[tuple[str, str], np.ndarray] = {}
        self._known = set(self.keys)

    def __len__(self) -> int:
        return self.rows

    # ---------------------------------------------------------------- building
    @classmethod
    def empty(cls) -> Table:
        return cls.from_chunk(Chunk(0))

    @classmethod
    def from_chunk(cls, chunk: Chunk) -> Table:
        return cls(chunk.rows, chunk.keys, lambda key: (chunk.values[key], chunk.kinds[key]), chunk.others)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> Table:
        return cls.from_chunk(columns_of(records))

    @classmethod
    def concat(cls, parts: list[Table]) -> Table:
        parts = [p for p in parts if p.rows]
        if len(parts) == 1:
            return parts[0]
        keys = list(dict.fromkeys(k for p in parts for k in p.keys))
        others: dict[str, dict[int, Any]] = {}
        offset = 0
        for p in parts:
            for key, rows in p._others.items():
                others.setdefault(key, {}).update({offset + i: v for i, v in rows.items()})
            offset += p.rows

        def load(key: str) -> tuple[np.ndarray, np.ndarray]:
            cols = [p.column(key) for p in parts]
            for p in parts:
                p.release(key)  # the parts' copies are not kept besides the whole
            return np.concatenate([c[0] for c in cols]), np.concatenate([c[1] for c in cols])

        return cls(offset, keys, load, others)

    def take(self, index: np.ndarray) -> Table:
        """The rows at `index` (in that order)."""
        index = np.asarray(index, np.int64)
        position = {int(r): i for i, r in enumerate(index)} if self._others else {}
        others = {key: {position[r]: v for r, v in rows.items() if r in position} for key, rows in self._others.items()}

        def load(key: str) -> tuple[np.ndarray, np.ndarray]:
            values, kinds = self.column(key)
            self.release(key)  # the whole column is not kept besides the rows taken
            return values[index], kinds[index]

        return Table(len(index), self.keys, load, others)

    # ---------------------------------------------------------------- columns
    def column(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, kinds) of `key`: NaN and ABSENT in rows without it (every row, for a key the log
        never has)."""
        if key not in self._known:  # one shared, read-only pair for every key the log lacks
            if "" not in self._missing:
                values, kinds = np.full(self.rows, np.nan), np.zeros(self.rows, np.uint8)
                values.flags.writeable = kinds.flags.writeable = False
                self._missing[""] = (values, kinds)
            return self._missing[""]
        if key not in self._loaded:
            values, kinds = self._loader(key)
            values.flags.writeable = kinds.flags.writeable = False  # shared by every caller
            self._loaded[key] = (values, kinds)
        return self._loaded[key]

    def kinds(self, key: str) -> np.ndarray:
        return self.column(key)[1]

    def present(self, key: str) -> np.ndarray:
        """Rows that have `key`, whatever its value."""
        return self.kinds(key) != ABSENT

    def _derived(self, what: str, key: str) -> np.ndarray:
        """is_number / numbers / finite of a key, computed once and read-only (rules ask for the same
        column many times; an all-number column's numbers are its values, not a copy)."""
        if (what, key) not in self._derived_cache:
            values, kinds = self.column(key)
            number = (kinds == INT) | (kinds == FLOAT) | (kinds == BIGINT)
            every = bool(number.all())
            if what == "is_number":
                out = number
            elif what == "numbers":
                out = values if every else np.where(number, values, np.nan)
            else:
                out = np.isfinite(values) if every else number & np.isfinite(values)
            if out is not values:
                out.flags.writeable = False
            self._derived_cache[(what, key)] = out
        return self._derived_cache[(what, key)]

    def is_number(self, key: str) -> np.ndarray:
        """Rows where `key` is an int or a float (not a bool): NaN and the infinities included."""
        return self._derived("is_number", key)

    def numbers(self, key: str) -> np.ndarray:
        """`key` as float64 where it is a number, NaN elsewhere (see is_number for which NaN is
        which). Read-only: copy it to change it."""
        return self._derived("numbers", key)

    def finite(self, key: str) -> np.ndarray:
        """Rows where `key` is a finite number."""
        return self._derived("finite", key)

    def numeric_keys(self) -> list[str]:
        """Keys that are a number in at least one row."""
        return [k for k in self.keys if self.is_number(k).any()]

    def release(self, key: str) -> None:
        """Forget a loaded column (memory of a long log, once a tool is done with it)."""
        self._loaded.pop(key, None)
        for what in ("is_number", "numbers", "finite"):
            self._derived_cache.pop((what, key), None)

    # ---------------------------------------------------------------- records
    def value(self, key: str, row: int) -> Any:
        """What record `row` holds at `key` (MISSING when it has no such key)."""
        values, kinds = self.column(key)
        kind = int(kinds[row])
        if kind == ABSENT:
            return MISSING
        if kind in (OTHER, BIGINT):
            return self._others[key][row]
        return _number_of(float(values[row]), kind)

    def record(self, row: int) -> dict[str, Any]:
        """Row `row` as the dict the log holds (keys in the log's order of first appearance)."""
        if row < 0:
            row += self.rows
        out = {}
        for key in self.keys:
            v = self.value(key, row)
            if v is not MISSING:
                out[key] = v
        return out

    def records(self) -> list[dict[str, Any]]:
        """Every row as a dict: what RunFolder.read_jsonl returns, for code that wants records."""
        cols = [(k, *self.column(k), self._others.get(k, {})) for k in self.keys]
        out: list[dict[str, Any]] = [{} for _ in range(self.rows)]
        for key, values, kinds, others in cols:
            kind_list, value_list = kinds.tolist(), values.tolist()
            for i, (kind, v) in enumerate(zip(kind_list, value_list)):
                if kind == FLOAT:
                    out[i][key] = v
                elif kind == INT:
                    out[i][key] = int(v)
                elif kind == BOOL:
                    out[i][key] = bool(v)
                elif kind in (OTHER, BIGINT):
                    out[i][key] = others[i]
        return out
