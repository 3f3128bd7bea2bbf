"""Corpus sources: where raw documents come from.

A source is a function `(DataConfig) -> list[CorpusFile]` registered by name; `data.corpus` names
a registered source or gives paths (files, directories, globs; comma-separated). Documents are
read lazily so a large corpus is never held in memory at once.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.config import DataConfig
from kiln.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".text")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus; `read()` yields the texts of its documents' texts."""

    path: Path
    text_field: str = "text"

    def read(self) -> Iterator[str]:
        yield from read_texts(self.path, self.text_field)

    def fingerprint(self) -> str:
        st = self.path.stat()
        return f"{self.path}:{st.st_size}:{st.st_mtime_ns}"


CorpusSource = Callable[[DataConfig], list[CorpusFile]]
CORPORA: dict[str, CorpusSource] = {}


def register_corpus(name: str) -> Callable[[CorpusSource], CorpusSource]:
    """Decorator: `@register_corpus("mine")` makes `data.corpus = "mine"` select the function."""

    def wrap(fn: CorpusSource) -> CorpusSource:
        CORPORA[name] = fn
        return fn

    return wrap


@register_corpus("stdlib")
def stdlib_corpus(cfg: DataConfig) -> list[CorpusFile]:
    """The Python standard library's source files (tests excluded): always present, ~11 MB of code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return [CorpusFile(p, cfg.text_field) for p in files]


def _strip_compression(name: str) -> tuple[str, str]:
    for comp in (".gz", ".zst"):
        if name.endswith(comp):
            return name[: -len(comp)], comp
    return name, ""


def _is_corpus_file(path: Path) -> bool:
    base, _ = _strip_compression(path.name)
    return base.endswith(SUFFIXES)


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        if not matches:
            raise DataError(f"data.corpus: the pattern '{spec}' matches no files")
        return [p for p in matches if p.is_file()]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _is_corpus_file(p))
        if not found:
            raise DataError(f"data.corpus: the directory '{spec}' holds no {'/'.join(SUFFIXES)} files")
        return found
    if path.is_file():
        return [path]
    raise DataError(
        f"data.corpus: '{spec}' is neither a registered corpus ({', '.join(sorted(CORPORA))}) "
        "nor an existing file, directory or glob"
    )


def resolve_corpus(cfg: DataConfig) -> list[CorpusFile]:
    """The documents `cfg.corpus` names, in a fixed order."""
    docs: list[CorpusFile] = []
    for spec in (s.strip() for s in cfg.corpus.split(",")):
        if not spec:
            continue
        if spec in CORPORA:
            docs.extend(CORPORA[spec](cfg))
            continue
        for p in _expand(spec):
            if not _is_corpus_file(p):
                raise DataError(
                    f"data.corpus: '{p}' is not a supported file; use {', '.join(SUFFIXES)} (optionally .gz or .zst)"
                )
            docs.append(CorpusFile(p, cfg.text_field))
    if not docs:
        raise DataError(f"data.corpus = '{cfg.corpus}' contains no files")
    return docs


def corpus_fingerprint(docs: list[CorpusFile]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.fingerprint().encode())
        h.update(d.text_field.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- file readers


def _open_binary(path: Path) -> io.BufferedIOBase:
    _, comp = _strip_compression(path.name)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        import zstandard

        return zstandard.open(path, "rb")
    return open(path, "rb")


def _decode(raw: bytes, path: Path) -> str | None:
    """UTF-8 text, or None for binary / non-UTF-8 files (the caller counts and skips them)."""
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class SkippedFile(Exception):
    """Raised for a file that is not UTF-8 text; `prepare` counts these."""


def read_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    base, _ = _strip_compression(path.name)
    if base.endswith(".parquet"):
        yield from _read_parquet(path, text_field)
        return
    if base.endswith(".jsonl"):
        yield from _read_jsonl(path, text_field)
        return
    try:
        with _open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SkippedFile(f"{path}: {e}") from None
    text = _decode(raw, path)
    if text is None:
        raise SkippedFile(f"{path}: not UTF-8 text")
    if text:
        yield text


def _utf8_text(path: Path) -> bool:
    """The whole file decodes as UTF-8 and does not start like a binary file, checked a chunk at a
    time (a file is taken or skipped whole, whatever its size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_binary(path) as f:
            first = True
            for chunk in iter(lambda: f.read(1 << 24), b""):
                if first and b"\x00" in chunk[:8192]:
                    return False
                first = False
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except (OSError, EOFError) as e:
        raise SkippedFile(f"{path}: {e}") from None
    return True


def _lines(f: io.BufferedIOBase) -> Iterator[bytes]:
    """A binary stream's lines, read in chunks (compressed readers need not iterate by line)."""
    rest = b""
    for chunk in iter(lambda: f.read(1 << 24), b""):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The records' texts a line at a time: memory is one record, not the file."""
    if not _utf8_text(path):
        raise SkippedFile(f"{path}: not UTF-8 text")
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(_lines(f), 1):
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{lineno}: not valid JSON") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{path}:{lineno}: no field '{text_field}'; set data.text_field")
                value = record[text_field]
                if not isinstance(value, str):
                    raise DataError(f"{path}:{lineno}: field '{text_field}' is not a string")
                if value:
                    yield value
    except (OSError, EOFError) as e:
        raise SkippedFile(f"{path}: {e}") from None


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        if path.name.endswith((".gz", ".zst")):  # parquet needs random access: decompress into memory
            import pyarrow as pa

            with _open_binary(path) as f:
                source = pa.BufferReader(f.read())
        else:
            source = path
        table = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise SkippedFile(f"{path}: not a readable parquet file ({e})") from None
    if column not in table.schema_arrow.names:
        raise DataError(
            f"{path}: no column '{column}' (columns: {', '.join(table.schema_arrow.names)}); set data.text_field"
        )
    for batch in table.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            if value:
                yield value
