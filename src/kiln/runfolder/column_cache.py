"""A columnar copy of a long JSONL log, kept beside it and extended as it grows, so that a tool
reads a million logged steps in the time it takes to load a few arrays.

    RUN/.metrics-cache/            for RUN/metrics.jsonl (".<stem>-cache" for any log)
        meta.json                  rows, keys, the byte offset of the log already read, checks
        <gen>-<i>.f8, <gen>-<i>.k1 key i's float64 values and kind codes, one per row (kiln.runfolder.columns)
        others.txt                 [row, key, value] of values that are not numbers, one a line
        lock                       held while the copy is checked and extended

Only complete lines are read (a run still appending has a line half written), and a line that
is not a JSON object ends the log for good, as in RunFolder.read_jsonl. A log that was replaced
(another inode), shortened or rewritten (its first or last bytes read so far differ) is read
again from the start. Where the run folder is read-only the copy lives in the user's cache
folder ($XDG_CACHE_HOME/kiln/columns, keyed by the log's path and inode); where no folder is
writable the log is read into memory. Logs under MIN_BYTES are always read into memory: parsing
them costs less than a cache folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from kiln.errors import DataError
from kiln.fileio import write_atomic
from kiln.runfolder.columns import ABSENT, Chunk, Table, columns_of, merge, parse_lines, parse_tail

VERSION = 1
MIN_BYTES = 1 << 20  # smaller logs are parsed on every read
CHUNK_BYTES = 8 << 20  # read and parsed at a time: bounds the memory of a first read
CHECK_BYTES = 1 << 16  # the first and last bytes already read, checked against a rewrite


class Unusable(Exception):
    """This cache folder cannot be used (not writable, incomplete and read-only): try the next."""


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln" / "columns"


def cache_folders(path: Path, st: os.stat_result) -> list[Path]:
    """Where a copy of the log at `path` may live: beside it, then in the user's cache folder."""
    beside = path.parent / f".{path.stem}-cache"
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]
    return [beside, cache_home() / f"{where}-{st.st_dev}-{st.st_ino}"]


def read_table(path: Path, min_bytes: int | None = None) -> Table:
    """The log at `path` as a Table (empty when there is no such file), through its columnar
    copy when it is long."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Table.empty()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not path.is_file():
        return Table.empty()
    if st.st_size >= (MIN_BYTES if min_bytes is None else min_bytes):
        for folder in cache_folders(path, st):
            try:
                return Store(folder, path).table()
            except (Unusable, OSError):
                continue  # read-only, full, or raced: the next place, or memory
    return read_in_memory(path)


def read_in_memory(path: Path) -> Table:
    """The whole log parsed into memory, a chunk at a time."""
    chunks: list[Chunk] = []
    try:
        with open(path, "rb") as f:
            carry, broken = b"", False
            while data := f.read(CHUNK_BYTES):
                buf = carry + data
                records, used, broken = parse_lines(buf)
                chunks.append(columns_of(records))
                carry = buf[used:]
                if broken:
                    break
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    tail = None if broken else parse_tail(carry)
    if tail is not None:
        chunks.append(columns_of([tail]))
    return Table.from_chunk(merge(chunks)) if chunks else Table.empty()


def _crc(f: IO[bytes], start: int, end: int) -> int:
    f.seek(start)
    return zlib.crc32(f.read(end - start))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[bool]:
    """An exclusive lock on the folder (True), or False when it is read-only."""
    try:
        handle = open(folder / "lock", "a+b")
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            yield False
            return
        raise
    with handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # no flock (not Linux): one reader at a time is the user's affair
            pass
        yield True


class Store:
    """The columnar copy of one log in one folder."""

    def __init__(self, folder: Path, log: Path):
        self.folder, self.log = Path(folder), Path(log)
        self.meta: dict[str, Any] = {}

    # ---------------------------------------------------------------- files
    def _file(self, index: int, suffix: str) -> Path:
        return self.folder / f"{self.meta['gen']}-{index}.{suffix}"

    def _read_meta(self) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("version") == VERSION else None

    def _commit(self) -> None:
        write_atomic(self.folder / "meta.json", json.dumps(self.meta))

    def _fresh(self, st: os.stat_result) -> dict[str, Any]:
        return {
            "version": VERSION,
            "gen": secrets.token_hex(4),  # file names of this version of the copy
            "ino": st.st_ino,
            "offset": 0,
            "rows": 0,
            "keys": [],
            "broken": False,
            "head": [0, 0],
            "tail": 0,
        }

    def _valid(self, meta: dict[str, Any] | None, f: IO[bytes], st: os.stat_result) -> bool:
        """The copy still describes the log's first `offset` bytes."""
        # not the device: clients of a shared file system number it each their own way
        if meta is None or meta["ino"] != st.st_ino or st.st_size < meta["offset"]:
            return False
        head_len, head_crc = meta["head"]
        offset = meta["offset"]
        return _crc(f, 0, head_len) == head_crc and _crc(f, max(0, offset - CHECK_BYTES), offset) == meta["tail"]

    def _reset(self, st: os.stat_result) -> None:
        """Start the copy again. A reader of the old one that has yet to load a column finds its
        file gone and says so, rather than mixing two versions of the log."""
        self.meta = self._fresh(st)
        for p in self.folder.iterdir():
            if p.name not in ("lock", "meta.json"):
                p.unlink(missing_ok=True)
        self._commit()

    # ---------------------------------------------------------------- reading
    def table(self) -> Table:
        """The log as a Table: the copy, extended first with what was appended since."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unusable(str(e)) from None
        with _locked(self.folder) as writable, open(self.log, "rb") as f:
            st = os.fstat(f.fileno())
            meta = self._read_meta()
            valid = self._valid(meta, f, st)
            if valid:
                assert meta is not None
                self.meta = meta
            if not writable:  # someone else's copy: usable only when nothing is left to read
                if not valid or (not self.meta["broken"] and self._has_more(f, st)):
                    raise Unusable(f"{self.folder} is read-only and out of date")
            else:
                if not valid:
                    self._reset(st)
                if not self.meta["broken"]:
                    self._extend(f)
            tail = b""
            if not self.meta["broken"]:
                f.seek(self.meta["offset"])
                tail = f.read()
                if b"\n" in tail:  # lines appended while this one read: the next reader takes them
                    tail = b""
            table = self._load()
        record = parse_tail(tail) if tail else None
        return Table.concat([table, Table.from_records([record])]) if record is not None else table

    def _has_more(self, f: IO[bytes], st: os.stat_result) -> bool:
        f.seek(self.meta["offset"])
        return b"\n" in f.read(st.st_size - self.meta["offset"])

    def _load(self) -> Table:
        rows, keys = self.meta["rows"], self.meta["keys"]
        index = {k: i for i, k in enumerate(keys)}
        others: dict[str, dict[int, Any]] = {}
        try:
            with open(self.folder / "others.txt", "rb") as f:
                for line in f:
                    row, key, value = json.loads(line)
                    if row < rows:  # lines past the committed rows: a write cut short
                        others.setdefault(key, {})[row] = value
        except FileNotFoundError:
            pass
        except ValueError:
            raise OSError(f"{self.folder}/others.txt is damaged") from None
        gen = self.meta["gen"]

        def load(key: str) -> tuple[np.ndarray, np.ndarray]:
            i = index[key]
            try:
                values = np.fromfile(self.folder / f"{gen}-{i}.f8", np.float64, rows)
                kinds = np.fromfile(self.folder / f"{gen}-{i}.k1", np.uint8, rows)
            except OSError:  # a reset by another reader removed this version's files
                values, kinds = np.zeros(0), np.zeros(0, np.uint8)
            if len(values) != rows or len(kinds) != rows:
                raise DataError(
                    f"the columnar copy of {self.log} changed while being read ({self.folder}); run the command again"
                )
            return values, kinds

        return Table(rows, keys, load, others)

    # ---------------------------------------------------------------- extending
    def _extend(self, f: IO[bytes]) -> None:
        """Read the complete lines appended since the last call, a chunk at a time."""
        f.seek(self.meta["offset"])
        carry = b""
        while data := f.read(CHUNK_BYTES):
            buf = carry + data
            records, used, broken = parse_lines(buf)
            if records:
                self._append(columns_of(records))
            self.meta["offset"] += used
            self.meta["broken"] = broken
            self._update_checks(f)
            self._commit()
            if broken:
                return
            carry = buf[used:]

    def _update_checks(self, f: IO[bytes]) -> None:
        position, offset = f.tell(), self.meta["offset"]
        if self.meta["head"][0] < CHECK_BYTES:
            head_len = min(offset, CHECK_BYTES)
            self.meta["head"] = [head_len, _crc(f, 0, head_len)]
        self.meta["tail"] = _crc(f, max(0, offset - CHECK_BYTES), offset)
        f.seek(position)

    def _append(self, chunk: Chunk) -> None:
        rows, keys = self.meta["rows"], self.meta["keys"]
        for key in chunk.keys:
            if key not in keys:  # a key first seen now: absent in every earlier row
                keys.append(key)
                i = len(keys) - 1
                np.full(rows, np.nan).tofile(self._file(i, "f8"))
                np.zeros(rows, np.uint8).tofile(self._file(i, "k1"))
        for i, key in enumerate(keys):
            if key in chunk.values:
                values, kinds = chunk.values[key], chunk.kinds[key]
            else:
                values, kinds = np.full(chunk.rows, np.nan), np.full(chunk.rows, ABSENT, np.uint8)
            for suffix, array, width in (("f8", values, 8), ("k1", kinds, 1)):
                with open(self._file(i, suffix), "r+b") as out:
                    out.truncate(rows * width)  # bytes past the committed rows: an append cut short
                    out.seek(0, os.SEEK_END)
                    array.tofile(out)
        if chunk.others:
            with open(self.folder / "others.txt", "a") as out:
                for key, by_row in chunk.others.items():
                    for row, value in by_row.items():
                        out.write(json.dumps([rows + row, key, value]) + "\n")
        self.meta["rows"] = rows + chunk.rows
