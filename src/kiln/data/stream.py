"""`kiln prepare` in bounded memory: documents flow from the corpus files through the split and
the tokenizer into shard files, a batch at a time, never all held at once.

The corpus is read three times (reading is cheap beside tokenising): once to count what each
split holds, once to train the tokenizer on a deterministic sample of the training text of at
most `data.tokenizer_sample_mb` (all of it below that, so a small corpus gets the tokenizer it
always got), and once to encode. Memory is one encoding batch (`ENCODE_BYTES` of text) and the
largest single document, whatever the corpus's size. The split is `split_documents`'s rule
applied document by document; its two corpus-wide fallbacks (no piece in validation, or none in
training) can only matter for a few pieces and are left to the in-memory path.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from kiln.data.corpora import CorpusFile, SkippedFile
from kiln.data.tokenizer import KilnTokenizer
from kiln.fileio import quick_digest, sha256_file
from kiln.progress import progress_bar

ENCODE_BYTES = 2 << 20  # text handed to the tokenizer at once (its threads share the batch; ~40x that in transient ids)
ENCODE_DOCS = 4096  # ... or at most this many documents
SAMPLE_SALT = 0x5A17  # the tokenizer sample's hash differs from the split's


@dataclass
class SplitCounts:
    """What one pass over the corpus found: texts and characters per split, files skipped."""

    train_texts: int = 0
    val_texts: int = 0
    train_chars: int = 0
    val_chars: int = 0
    documents: int = 0
    skipped: int = 0


def read_documents(files: list[CorpusFile], max_docs: int, counts: SplitCounts, label: str | None) -> Iterator[str]:
    """Every document's text in corpus order (at most `max_docs`), counting unreadable files;
    progress by files under `label` (None: the caller shows its own)."""
    n = 0
    for f in progress_bar(files, label, unit="files") if label else files:
        try:
            for text in f.read():
                yield text
                n += 1
                if max_docs and n >= max_docs:
                    return
        except SkippedFile:
            counts.skipped += 1


def drain(items: Iterable[object]) -> None:
    """Run a pass for what it counts, keeping nothing."""
    deque(items, maxlen=0)


def progress_mb(
    items: Iterable[tuple[bool, str]],
    label: str,
    counts: SplitCounts,
    tokens: Callable[[], float] | None = None,
) -> Iterator[tuple[bool, str]]:
    """A pass after the counting one: progress in megabytes of text (characters), its rate and
    ETA, against the total the counting pass found (one big JSONL file shows progress too);
    `tokens()`, when given, counts the tokens written, shown as tokens/s."""
    total = (counts.train_chars + counts.val_chars) / 2**20
    extra = (tokens, "tokens") if tokens is not None else None
    return progress_bar(items, label, unit="MB", weight=lambda item: len(item[1]) / 2**20, total=total, extra=extra)


def piece_key(piece: str) -> str:
    return hashlib.sha256(piece.encode("utf-8", "surrogatepass")).hexdigest()


def split_stream(
    docs: Iterable[str],
    is_val: Callable[[str], bool],
    split_pieces: Callable[[str], list[str]],
    counts: SplitCounts,
) -> Iterator[tuple[bool, str]]:
    """(in validation, text) in corpus order: each document cut into pieces, each piece's split
    decided by its content, consecutive pieces of a document in the same split joined again."""
    for text in docs:
        if not text.strip():
            continue
        counts.documents += 1
        run: tuple[bool, list[str]] | None = None
        for piece in split_pieces(text):
            if not piece.strip():
                continue
            v = is_val(piece_key(piece))
            if run is not None and run[0] == v:
                run[1].append(piece)
                continue
            if run is not None:
                yield _count(run, counts)
            run = (v, [piece])
        if run is not None:
            yield _count(run, counts)


def _count(run: tuple[bool, list[str]], counts: SplitCounts) -> tuple[bool, str]:
    v, parts = run
    text = "".join(parts)
    if v:
        counts.val_texts += 1
        counts.val_chars += len(text)
    else:
        counts.train_texts += 1
        counts.train_chars += len(text)
    return v, text


def sampled(texts: Iterable[str], fraction: float, seed: int) -> Iterator[str]:
    """The texts whose content hash falls below `fraction` (all of them at 1): a sample that
    depends on the text only, the same on every machine."""
    for text in texts:
        if fraction >= 1.0:
            yield text
        else:
            h = int.from_bytes(
                hashlib.sha256(f"{seed}:{SAMPLE_SALT}:".encode() + piece_key(text).encode()).digest()[:8], "little"
            )
            if h / 2**64 < fraction:
                yield text


class ShardWriter:
    """Token ids appended to `prefix-NNNNN.bin` files of at most `shard_tokens` each, written as
    they come (nothing buffered beyond the caller's batch). `state` (from `state()` of an
    interrupted build) continues one: its finished shards kept, its open shard cut back to what
    was recorded."""

    def __init__(self, out: Path, prefix: str, dtype: np.dtype, shard_tokens: int, state: dict | None = None):
        self.out, self.prefix, self.dtype, self.shard_tokens = out, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = list((state or {}).get("shards", []))
        self.documents = int((state or {}).get("documents", 0))
        self.tokens = int((state or {}).get("tokens", 0))
        self._file: IO[bytes] | None = None
        self._in_shard = int((state or {}).get("open_tokens", 0))
        if self._in_shard:
            self._file = open(self.out / self._name(), "r+b")
            self._file.truncate(self._in_shard * self.dtype.itemsize)
            self._file.seek(0, 2)

    def add(self, ids: np.ndarray) -> bool:
        """One document's ids (its EOS included); a shard closes once it holds `shard_tokens`
        (True then)."""
        if self._file is None:
            self._file = open(self.out / self._name(), "wb")
        self._file.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self._in_shard += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        if self._in_shard >= self.shard_tokens:
            self._close_shard()
            return True
        return False

    def state(self) -> dict[str, Any]:
        """What continues this writer after an interruption (its open shard flushed to disk)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {
            "shards": self.shards,
            "documents": self.documents,
            "tokens": self.tokens,
            "open_tokens": self._in_shard,
        }

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):05d}.bin"

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        file = self.out / self._name()
        self.shards.append(
            {"file": file.name, "tokens": self._in_shard, "sha256": sha256_file(file), "quick": quick_digest(file)}
        )
        self._in_shard = 0

    def close(self) -> dict[str, Any]:
        self._close_shard()
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def encode_stream(
    items: Iterable[tuple[bool, str]],
    tok: KilnTokenizer,
    writers: dict[bool, ShardWriter],
    pieces: Callable[[str], list[str]],
    skip: int = 0,
    on_shard: Callable[[int], None] | None = None,
) -> None:
    """Tokenise (split, text) items a batch at a time into the writers, in order; each document
    ends with EOS. The first `skip` items are passed over (an interrupted build resumed);
    `on_shard(n)` is called whenever a shard closes, `n` the items written so far."""
    eos = tok.eos_id
    assert eos is not None  # eos is a required role: KilnTokenizer refuses a tokenizer without it
    batch: list[tuple[bool, str]] = []
    size = 0
    done = skip  # items written (or passed over) before the batch

    def flush() -> None:
        nonlocal done
        parts = [(j, p) for j, (_, text) in enumerate(batch) for p in pieces(text)]
        encoded = tok.encode_batch([p for _, p in parts])
        per_doc: list[list[int]] = [[] for _ in batch]
        for (j, _), ids in zip(parts, encoded):
            per_doc[j].extend(ids)
        for j, ((v, _), ids) in enumerate(zip(batch, per_doc)):
            ids.append(eos)
            if writers[v].add(np.asarray(ids, dtype=np.int64)) and on_shard is not None:
                on_shard(done + j + 1)
        done += len(batch)
        batch.clear()

    for n, (v, text) in enumerate(items):
        if n < skip:
            continue
        batch.append((v, text))
        size += len(text)
        if size >= ENCODE_BYTES or len(batch) >= ENCODE_DOCS:
            flush()
            size = 0
    if batch:
        flush()
