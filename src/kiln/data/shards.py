"""`kiln prepare`: corpus -> tokenizer -> memory-mapped token shards plus a manifest.

Layout of one prepared dataset (a folder under `data.cache_dir`, named by a hash of everything
that determines its contents, so unchanged inputs reuse it):

    tokenizer.json
    manifest.json          documents, tokens, dtype, tokenizer hash, sha256 of every shard and
                           a quick digest (size, head, tail) checked at every start
    train-00000.bin ...    token ids, documents separated by EOS
    val-00000.bin ...

The folder is built under a temporary name and renamed into place, so an interrupted
`prepare` never leaves a half-written dataset that looks valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from kiln.config import DataConfig
from kiln.data import stream
from kiln.data.corpora import CorpusFile, corpus_fingerprint, resolve_corpus
from kiln.data.tokenizer import KilnTokenizer, load_tokenizer, train_tokenizer
from kiln.errors import DataError
from kiln.fileio import quick_digest, sha256_files

FORMAT_VERSION = 3  # 2: content-keyed split with long documents cut into pieces; 3: streamed, sampled tokenizer
SHARD_TOKENS = 1 << 27  # 128M tokens per shard file
MAX_PIECE_CHARS = 1 << 20  # a huge single-line document is tokenised in pieces of this size


@dataclass
class Prepared:
    """A prepared dataset on disk, checked against its manifest."""

    path: Path
    manifest: dict[str, Any]
    tokenizer: KilnTokenizer

    def split(self, name: str) -> list[np.ndarray]:
        """The split's shards as read-only memory maps."""
        dtype = np.dtype(self.manifest["dtype"])
        return [
            np.memmap(self.path / s["file"], dtype=dtype, mode="r") for s in self.manifest["splits"][name]["shards"]
        ]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])


def dataset_key(cfg: DataConfig, files: list[CorpusFile]) -> str:
    tok = ""
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer).sha256
    parts = [
        str(FORMAT_VERSION),
        corpus_fingerprint(files),
        str(cfg.vocab_size),
        tok,
        repr(cfg.val_fraction),
        str(cfg.split_seed),
        str(cfg.max_docs),
        cfg.text_field,
        str(cfg.piece_chars),
        str(cfg.tokenizer_sample_mb),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def open_prepared(path: Path, verify: str | bool = "quick") -> Prepared:
    """Open a prepared dataset, checked against its manifest: `quick` (each run's start: every
    shard's size and a digest of its head and tail, constant time per shard), `full` (`kiln
    prepare --verify`: every byte's sha256, shards hashed in parallel) or False."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path} is not a prepared dataset (no manifest.json); run `kiln prepare`")
    manifest = json.loads(manifest_path.read_text())
    tokenizer = load_tokenizer(path / "tokenizer.json")  # with its roles sidecar, if any
    if tokenizer.sha256 != manifest["tokenizer_sha256"]:
        raise DataError(
            f"{path}/tokenizer.json does not match the tokenizer the shards were made with; "
            f"delete {path} and run `kiln prepare` again"
        )
    if verify is True:
        verify = "quick"
    if verify:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
        files = [path / shard["file"] for shard in shards]
        for shard, file in zip(shards, files):
            intact = file.is_file() and file.stat().st_size == shard["tokens"] * itemsize
            if intact and verify == "quick" and "quick" in shard:  # datasets before it: the size only
                intact = quick_digest(file) == shard["quick"]
            if not intact:
                _corrupt(file, path)
        if verify == "full":
            for shard, file, digest in zip(shards, files, sha256_files(files)):
                if digest != shard["sha256"]:
                    _corrupt(file, path)
    return Prepared(path, manifest, tokenizer)


def _corrupt(file: Path, dataset: Path) -> NoReturn:
    raise DataError(
        f"shard {file} is missing or its checksum does not match the manifest "
        f"(corrupt cache); delete {dataset} and run `kiln prepare` again"
    )


def _is_val(key: str, seed: int, fraction: float) -> bool:
    return _split_hash(key, seed) / 2**64 < fraction


def _split_hash(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def split_pieces(text: str, piece_chars: int) -> list[str]:
    """A document cut into pieces of at most `piece_chars` characters, each ending at the last
    line break inside the limit (or at the limit when a line is longer); 0 = never cut."""
    if not piece_chars or len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = text.rfind("\n", start, start + piece_chars)
        end = cut + 1 if cut >= start else start + piece_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def split_documents(docs: list[str], seed: int, fraction: float, piece_chars: int) -> tuple[list[str], list[str]]:
    """(train texts, validation texts), by a rule that depends only on the texts, the seed and
    the fraction — not on file paths, so a copy of the corpus elsewhere splits the same way.

    Documents longer than `piece_chars` are first cut into pieces at line breaks (one big text
    file is the most common first corpus). Each piece goes to validation when a hash of
    (seed, its content) falls below `fraction`; identical pieces therefore always land in the
    same split. Consecutive pieces of a document that land in the same split are joined again,
    so the split only cuts a document where it has to. If no piece falls in validation, the
    one with the smallest hash does; if all do, the first stays in training."""
    pieces = [(d, p) for d, text in enumerate(docs) for p in split_pieces(text, piece_chars) if p.strip()]
    keys = [hashlib.sha256(p.encode("utf-8", "surrogatepass")).hexdigest() for _, p in pieces]
    is_val = [_is_val(k, seed, fraction) for k in keys]
    if pieces and not any(is_val):
        is_val[min(range(len(pieces)), key=lambda i: _split_hash(keys[i], seed))] = True
    if pieces and all(is_val):
        is_val[0] = False
    train: list[str] = []
    val: list[str] = []
    last: tuple[int, bool] | None = None
    for (d, piece), v in zip(pieces, is_val):
        out = val if v else train
        if last == (d, v):
            out[-1] += piece
        else:
            out.append(piece)
        last = (d, v)
    return train, val


def _pieces(text: str) -> list[str]:
    if len(text) <= MAX_PIECE_CHARS:
        return [text]
    return [text[i : i + MAX_PIECE_CHARS] for i in range(0, len(text), MAX_PIECE_CHARS)]


def unigram_entropy(shards: Sequence[np.ndarray], vocab_size: int) -> float:
    """Entropy of the token distribution in nats per token (the loss of a model that ignores context)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk = 1 << 22  # tokens at a time: shards are memory maps, and bincount makes an int64 copy (32 MB here)
    for s in shards:
        for i in range(0, len(s), chunk):
            counts += np.bincount(np.asarray(s[i : i + chunk]), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def writable_cache(cfg: DataConfig) -> Path:
    """`data.cache_dir`, created if needed; one line when it cannot be written."""
    cache = Path(cfg.cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data.cache_dir '{cache}' cannot be created ({e.strerror}); choose a writable folder"
        ) from None
    if not os.access(cache, os.W_OK):
        raise DataError(f"data.cache_dir '{cache}' is not writable; choose a writable folder")
    return cache


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final`, renamed to it when the block ends normally (a twin
    process that finished first wins) and removed in any case: an interrupted build never leaves
    a folder that looks complete."""
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent twin: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_items(cfg: DataConfig, files: list[CorpusFile]) -> Callable[[str | None, stream.SplitCounts], Iterator]:
    """A pass over the corpus: `items(label, counts)` yields (in validation, text) in corpus order,
    split by content (`split_documents`' rule, document by document)."""
    seed, fraction, piece_chars = cfg.split_seed, cfg.val_fraction, cfg.piece_chars

    def items(label: str | None, counts: stream.SplitCounts) -> Iterator[tuple[bool, str]]:
        docs = stream.read_documents(files, cfg.max_docs, counts, label)
        return stream.split_stream(
            docs, lambda k: _is_val(k, seed, fraction), lambda t: split_pieces(t, piece_chars), counts
        )

    return items


def count_corpus(cfg: DataConfig, items: Callable, log: Callable[[str], None] = print) -> stream.SplitCounts:
    """The counting pass: texts and characters per split; a corpus with no text is refused."""
    counts = stream.SplitCounts()
    stream.drain(items("reading corpus", counts))
    if counts.skipped:
        log(f"skipped {counts.skipped} file(s) that are not UTF-8 text")
    if not counts.documents:
        raise DataError(
            f"data.corpus = '{cfg.corpus}' holds no text"
            + (f" ({counts.skipped} binary or non-UTF-8 file(s) skipped)" if counts.skipped else "")
        )
    return counts


PROGRESS = "progress.json"  # an unfinished build's record of its finished shards


@contextmanager
def resumable(final: Path) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """A build folder beside `final` that outlives an interruption: `<name>.partial`, whose
    progress.json (written at each finished shard) lets the next build continue it; renamed to
    `final` when the block ends normally. Yields (folder, progress or None). One process builds a
    dataset there at a time (a file lock); another that starts meanwhile builds in a private
    folder, as `staged` does."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f"{final.name}.lock"
    lock = open(lock_path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        with staged(final) as tmp:
            yield tmp, None
        return
    try:
        partial = final.parent / f"{final.name}.partial"
        progress = None
        try:
            progress = json.loads((partial / PROGRESS).read_text())
            if load_tokenizer(partial / "tokenizer.json").sha256 != progress["tokenizer_sha256"]:
                progress = None
        except (OSError, ValueError, KeyError, DataError):
            progress = None
        if progress is None:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        yield partial, progress
        try:
            os.rename(partial, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a twin that finished first: a real failure
                raise
            shutil.rmtree(partial, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
    finally:
        lock.close()  # (releases the lock)


def save_progress(folder: Path, progress: dict[str, Any]) -> None:
    tmp = folder / f"{PROGRESS}.tmp"
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, folder / PROGRESS)


def prepare(
    cfg: DataConfig,
    log=print,
    files: list[CorpusFile] | None = None,
    counts: stream.SplitCounts | None = None,
) -> Prepared:
    """Make (or reuse) the token shards for `cfg` and return them, checked. Streams the corpus in
    bounded memory (kiln.data.stream); a corpus too small for the streaming split's rule (no
    piece in one of the splits) is split in memory by `split_documents`'s fallbacks. `files` and
    `counts`: the corpus's files and counting pass when the caller already has them (a mixture's
    tokenizer counted each source), so the corpus is not read for them again."""
    if cfg.workers:
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.workers))
    files = files if files is not None else resolve_corpus(cfg)
    key = dataset_key(cfg, files)
    final = Path(cfg.cache_dir).expanduser() / key
    if (final / "manifest.json").is_file():
        return open_prepared(final)
    writable_cache(cfg)

    start = time.perf_counter()
    items = corpus_items(cfg, files)
    counts = counts if counts is not None else count_corpus(cfg, items, log)
    in_memory: tuple[list[str], list[str]] | None = None
    if not counts.train_texts or not counts.val_texts:  # a few pieces: split_documents' fallbacks decide
        in_memory = _split_in_memory(cfg, files)

    with resumable(final) as (tmp, progress):
        if progress is not None:
            tok = load_tokenizer(tmp / "tokenizer.json")
            done = len(progress["train"]["shards"]) + len(progress["val"]["shards"])
            log(f"resuming an interrupted prepare: {done} finished shard(s), {progress['items']} texts written")
        else:
            tok = _new_tokenizer(cfg, items, counts, in_memory, log)
            tok.save(tmp / "tokenizer.json")
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
        splits = _write_shards(tmp, tok, dtype, progress, items, counts, in_memory)
        seconds = time.perf_counter() - start
        manifest = _manifest(cfg, key, files, counts, tok, dtype, splits, tmp, seconds)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / PROGRESS).unlink(missing_ok=True)
    tr, va = splits["train"], splits["val"]
    log(
        f"prepared {tr['documents']} + {va['documents']} documents, {tr['tokens']:,} + {va['tokens']:,} tokens "
        f"(train + validation) in {seconds:.1f}s ({(tr['tokens'] + va['tokens']) / max(seconds, 1e-9):,.0f} tokens/s) "
        f"-> {final}"
    )
    return open_prepared(final)


def _split_in_memory(cfg: DataConfig, files: list[CorpusFile]) -> tuple[list[str], list[str]]:
    """A corpus too small for the streaming split's rule, read and split by `split_documents`
    (whose fallbacks put a piece in each split); one short document is refused."""
    docs = [t for t in stream.read_documents(files, cfg.max_docs, stream.SplitCounts(), "reading corpus") if t.strip()]
    in_memory = split_documents(docs, cfg.split_seed, cfg.val_fraction, cfg.piece_chars)
    if not in_memory[0] or not in_memory[1]:
        raise DataError(
            f"data.corpus = '{cfg.corpus}' is one short document ({len(docs[0])} characters); a "
            "train/validation split needs at least two pieces: add text, or lower data.piece_chars "
            f"(now {cfg.piece_chars}) so the document is cut into pieces"
        )
    return in_memory


def _new_tokenizer(
    cfg: DataConfig,
    items: Callable,
    counts: stream.SplitCounts,
    in_memory: tuple[list[str], list[str]] | None,
    log: Callable[[str], None],
) -> KilnTokenizer:
    """`data.tokenizer` when one is given, else a BPE tokenizer trained on (a sample of) the
    training texts."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)

    def train_texts() -> Iterator[str]:
        if in_memory is not None:
            yield from in_memory[0]
            return
        passed = stream.progress_mb(items(None, stream.SplitCounts()), "training tokenizer", counts)
        yield from (text for v, text in passed if not v)

    sample = min(1.0, cfg.tokenizer_sample_mb * 2**20 / max(1, counts.train_chars))
    what = "all" if sample >= 1.0 else f"a {sample:.1%} sample"
    log(
        f"training a byte-level BPE tokenizer (vocabulary {cfg.vocab_size}) on {what} of "
        f"{counts.train_texts} training documents ({counts.train_chars / 2**20:.1f}M characters)"
    )
    return train_tokenizer(
        (p for t in stream.sampled(train_texts(), sample, cfg.split_seed) for p in _pieces(t)), cfg.vocab_size
    )


def _write_shards(
    tmp: Path,
    tok: KilnTokenizer,
    dtype: np.dtype,
    progress: dict[str, Any] | None,
    items: Callable,
    counts: stream.SplitCounts,
    in_memory: tuple[list[str], list[str]] | None,
) -> dict[str, Any]:
    """Tokenise the corpus into train and validation shards in `tmp`, continuing an interrupted
    build's `progress` (a streamed build records its progress at every finished shard); returns
    the splits' manifest entries."""
    writers = {
        False: stream.ShardWriter(tmp, "train", dtype, SHARD_TOKENS, (progress or {}).get("train")),
        True: stream.ShardWriter(tmp, "val", dtype, SHARD_TOKENS, (progress or {}).get("val")),
    }

    def checkpoint(written: int) -> None:
        state = {"items": written, "train": writers[False].state(), "val": writers[True].state()}
        save_progress(tmp, {**state, "tokenizer_sha256": tok.sha256})

    if in_memory is None:

        def written() -> float:
            return float(writers[False].tokens + writers[True].tokens)

        encoded = stream.progress_mb(items(None, stream.SplitCounts()), "tokenising", counts, written)
        checkpoint((progress or {}).get("items", 0))  # the tokenizer is kept from here on
    else:
        encoded = ((v, t) for v, texts in ((False, in_memory[0]), (True, in_memory[1])) for t in texts)
    stream.encode_stream(
        encoded,
        tok,
        writers,
        _pieces,
        skip=(progress or {}).get("items", 0),
        on_shard=checkpoint if in_memory is None else None,
    )
    return {"train": writers[False].close(), "val": writers[True].close()}


def _manifest(
    cfg: DataConfig,
    key: str,
    files: list[CorpusFile],
    counts: stream.SplitCounts,
    tok: KilnTokenizer,
    dtype: np.dtype,
    splits: dict[str, Any],
    tmp: Path,
    seconds: float,
) -> dict[str, Any]:
    """The manifest.json of a dataset built in `tmp`."""
    val_maps = [np.memmap(tmp / s["file"], dtype=dtype, mode="r") for s in splits["val"]["shards"]]
    return {
        "format": FORMAT_VERSION,
        "key": key,
        "corpus": cfg.corpus,
        "corpus_files": len(files),
        "skipped_files": counts.skipped,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eos_id": tok.eos_id,
        "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction,
        "val_unigram_entropy": unigram_entropy(val_maps, tok.vocab_size),
        "splits": splits,
        # what the data is, wherever it came from: resume and comparisons check this
        "content_key": hashlib.sha256(
            "\n".join([tok.sha256] + [sh["sha256"] for sp in splits.values() for sh in sp["shards"]]).encode()
        ).hexdigest()[:20],
        "piece_chars": cfg.piece_chars,
        "seconds": round(seconds, 2),
    }
