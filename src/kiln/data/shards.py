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

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from kiln.config import DataConfig
from kiln.data.corpora import CorpusFile, SkippedFile, corpus_fingerprint, resolve_corpus
from kiln.data.tokenizer import KilnTokenizer, load_tokenizer, train_tokenizer
from kiln.errors import DataError
from kiln.fileio import quick_digest, sha256_file, sha256_files
from kiln.progress import progress_bar

FORMAT_VERSION = 2  # 2: content-keyed split with long documents cut into pieces
SHARD_TOKENS = 1 << 27  # 128M tokens per shard file
MAX_PIECE_CHARS = 1 << 20  # a huge single-line document is tokenised in pieces of this size
ENCODE_BATCH = 64


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


def _read_documents(files: list[CorpusFile], max_docs: int) -> tuple[list[str], int]:
    """The text of every document, and the number of files skipped as non-text."""
    docs: list[str] = []
    skipped = 0
    for f in progress_bar(files, "reading corpus", unit="files"):
        try:
            for text in f.read():
                docs.append(text)
                if max_docs and len(docs) >= max_docs:
                    return docs, skipped
        except SkippedFile:
            skipped += 1
    return docs, skipped


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


def _encode_split(
    texts: list[str], tok: KilnTokenizer, dtype: np.dtype, out: Path, prefix: str, label: str
) -> dict[str, Any]:
    shards: list[dict[str, Any]] = []
    buf: list[np.ndarray] = []
    buf_tokens = 0
    total = 0

    def flush() -> None:
        nonlocal buf, buf_tokens
        if not buf_tokens:
            return
        name = f"{prefix}-{len(shards):05d}.bin"
        arr = np.concatenate(buf).astype(dtype, copy=False)
        arr.tofile(out / name)
        file = out / name
        shards.append({"file": name, "tokens": int(arr.size), "sha256": sha256_file(file), "quick": quick_digest(file)})
        buf, buf_tokens = [], 0

    eos = tok.eos_id
    assert eos is not None  # eos is a required role: KilnTokenizer refuses a tokenizer without it
    batches = [texts[i : i + ENCODE_BATCH] for i in range(0, len(texts), ENCODE_BATCH)]
    for batch in progress_bar(batches, f"tokenising {label}", unit="batches"):
        pieces = [(j, p) for j, text in enumerate(batch) for p in _pieces(text)]
        encoded = tok.encode_batch([p for _, p in pieces])
        per_doc: list[list[int]] = [[] for _ in batch]
        for (j, _), ids in zip(pieces, encoded):
            per_doc[j].extend(ids)
        for ids in per_doc:
            ids.append(eos)
            arr = np.asarray(ids, dtype=np.int64)
            buf.append(arr)
            buf_tokens += arr.size
            total += arr.size
        if buf_tokens >= SHARD_TOKENS:
            flush()
    flush()
    return {"documents": len(texts), "tokens": total, "shards": shards}


def unigram_entropy(shards: list[np.ndarray], vocab_size: int) -> float:
    """Entropy of the token distribution in nats per token (the loss of a model that ignores context)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in shards:
        counts += np.bincount(np.asarray(s), minlength=vocab_size)[:vocab_size]
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


def prepare(cfg: DataConfig, log=print) -> Prepared:
    """Make (or reuse) the token shards for `cfg` and return them, verified."""
    if cfg.workers:
        os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.workers))
    files = resolve_corpus(cfg)
    key = dataset_key(cfg, files)
    final = Path(cfg.cache_dir).expanduser() / key
    if (final / "manifest.json").is_file():
        return open_prepared(final)
    writable_cache(cfg)

    start = time.perf_counter()
    docs, skipped = _read_documents(files, cfg.max_docs)
    if skipped:
        log(f"skipped {skipped} file(s) that are not UTF-8 text")
    docs = [t for t in docs if t.strip()]
    if not docs:
        raise DataError(
            f"data.corpus = '{cfg.corpus}' holds no text"
            + (f" ({skipped} binary or non-UTF-8 file(s) skipped)" if skipped else "")
        )
    train_texts, val_texts = split_documents(docs, cfg.split_seed, cfg.val_fraction, cfg.piece_chars)
    if not train_texts or not val_texts:
        raise DataError(
            f"data.corpus = '{cfg.corpus}' is one short document ({len(docs[0])} characters); a "
            "train/validation split needs at least two pieces: add text, or lower data.piece_chars "
            f"(now {cfg.piece_chars}) so the document is cut into pieces"
        )

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        log(f"training a byte-level BPE tokenizer (vocabulary {cfg.vocab_size}) on {len(train_texts)} documents")
        tok = train_tokenizer((p for t in train_texts for p in _pieces(t)), cfg.vocab_size)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)

    with staged(final) as tmp:
        tok.save(tmp / "tokenizer.json")
        splits = {
            "train": _encode_split(train_texts, tok, dtype, tmp, "train", "train split"),
            "val": _encode_split(val_texts, tok, dtype, tmp, "val", "validation split"),
        }
        val_maps = [np.fromfile(tmp / s["file"], dtype=dtype) for s in splits["val"]["shards"]]
        manifest = {
            "format": FORMAT_VERSION,
            "key": key,
            "corpus": cfg.corpus,
            "corpus_files": len(files),
            "skipped_files": skipped,
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
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tr, va = splits["train"], splits["val"]
    log(
        f"prepared {tr['documents']} + {va['documents']} documents, {tr['tokens']:,} + {va['tokens']:,} tokens "
        f"(train + validation) in {manifest['seconds']:.1f}s -> {final}"
    )
    return open_prepared(final)
