"""Preparing image-text data: a source -> tokenizer, tokenised text, encoded images, an index.

One prepared dataset is a folder under `data.cache_dir`, named by a hash of what determines it
(built under a temporary name and renamed into place, like text shards):

    tokenizer.json
    manifest.json      counts, tokenizer hash, sha256 of every file below
    text.bin           token ids of every text segment, back to back
    images.bin         every image's encoded bytes (as the source gave them), back to back
    images.npy         int64 offsets into images.bin (n_images + 1)
    segments.npy       int64 (n_segments, 3): kind (0 text, 1 image), start, length
    samples.npy        int64 offsets into segments (n_samples + 1)
    train.npy, val.npy the samples of each split (by a hash of their content)

Images are kept encoded and decoded by the loader's workers, so `model.image_size` and
`model.patch_size` can change without preparing again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import DataConfig
from kiln.data.multimodal.images import image_problem
from kiln.data.multimodal.sources import resolve_source
from kiln.data.shards import _is_val, _split_hash, staged, unigram_entropy, writable_cache
from kiln.data.tokenizer import KilnTokenizer, load_tokenizer, train_tokenizer
from kiln.errors import DataError, NotApplicable
from kiln.fileio import quick_digest, sha256_file, sha256_files
from kiln.progress import progress_bar

FORMAT = "kiln-image-text-1"
TEXT, IMAGE = 0, 1
FILES = ("text.bin", "images.bin", "images.npy", "segments.npy", "samples.npy", "train.npy", "val.npy")


class MultimodalPrepared:
    """A prepared image-text dataset, checked against its manifest (memory-mapped, read-only)."""

    def __init__(self, path: Path, manifest: dict[str, Any], tokenizer: KilnTokenizer):
        self.path, self.manifest, self.tokenizer = Path(path), manifest, tokenizer
        self.text = np.memmap(self.path / "text.bin", dtype=np.dtype(manifest["dtype"]), mode="r")
        self.images = np.memmap(self.path / "images.bin", dtype=np.uint8, mode="r")
        self.image_offsets = np.load(self.path / "images.npy")
        self.segments = np.load(self.path / "segments.npy")
        self.samples = np.load(self.path / "samples.npy")

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def split_ids(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy")

    def split(self, name: str) -> list[np.ndarray]:
        raise NotApplicable("reads held-out text windows; this run's data is image-text samples")

    def positions(self, ids: np.ndarray, n_patches: int, with_images: bool = True) -> np.ndarray:
        """Sequence positions each sample takes: BOS + text tokens + n_patches per image + EOS."""
        seg = self.segments
        kind, length = seg[:, 0], seg[:, 2]
        per_segment = np.where(kind == TEXT, length, n_patches if with_images else 0)
        cum = np.concatenate([[0], np.cumsum(per_segment)])
        return (cum[self.samples[ids + 1]] - cum[self.samples[ids]] + 2).astype(np.int64)

    def sample_segments(self, sample: int) -> np.ndarray:
        return self.segments[self.samples[sample] : self.samples[sample + 1]]

    def text_tokens(self, start: int, length: int) -> np.ndarray:
        return np.asarray(self.text[start : start + length], dtype=np.int64)

    def image_bytes(self, index: int) -> bytes:
        return self.images[self.image_offsets[index] : self.image_offsets[index + 1]].tobytes()


def dataset_key(cfg: DataConfig, fingerprint: str) -> str:
    tok = load_tokenizer(cfg.tokenizer).sha256 if cfg.tokenizer else ""
    parts = [
        FORMAT,
        fingerprint,
        str(cfg.vocab_size),
        tok,
        repr(cfg.val_fraction),
        str(cfg.split_seed),
        str(cfg.max_docs),
        cfg.text_field,
        cfg.image_field,
    ]
    return "mm-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def open_multimodal(path: Path, verify: str | bool = "quick") -> MultimodalPrepared:
    """Open a prepared image-text dataset, checked against its manifest: `quick` (each start:
    each file's size and a digest of its head and tail, constant time), `full` (every byte's
    sha256, files hashed in parallel: `kiln prepare --verify`) or False. Datasets made before
    the quick digests were recorded are hashed in full."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path} is not a prepared image-text dataset (no manifest.json); delete it and train again")
    manifest = json.loads(manifest_path.read_text())
    tokenizer = load_tokenizer(path / "tokenizer.json")
    if verify:
        files = [path / name for name in FILES]
        missing = [f for f in files if not f.is_file()]
        quick = manifest.get("quick") if verify != "full" else None
        if quick:
            bad = missing or [f for f in files if quick_digest(f) != quick[f.name]]
        else:
            bad = missing or [f for f, d in zip(files, sha256_files(files)) if d != manifest["sha256"][f.name]]
        if bad:
            raise DataError(
                f"{bad[0]} is missing or does not match its checksum (corrupt cache); delete {path} and train again"
            )
    return MultimodalPrepared(path, manifest, tokenizer)


def _read(cfg: DataConfig, source, images_out) -> tuple[list[list[tuple[int, Any]]], list[str], int]:
    """Every sample as [(kind, text | image index)], the texts, and the number of images; image
    bytes are streamed to `images_out` (offsets appended to its `offsets` list)."""
    samples: list[list[tuple[int, Any]]] = []
    texts: list[str] = []
    n_images = 0
    for sample in progress_bar(source.samples(), "reading image-text samples", unit="samples"):
        entry = []
        for seg in sample:
            if isinstance(seg, str):
                if seg.strip():
                    entry.append((TEXT, len(texts)))
                    texts.append(seg)
            else:
                problem = image_problem(seg)
                if problem is not None:
                    raise DataError(
                        f"data.corpus = '{cfg.corpus}': sample {len(samples)} holds an image Pillow cannot "
                        f"decode ({problem}); remove or re-encode it"
                    )
                images_out.write(seg)
                images_out.offsets.append(images_out.offsets[-1] + len(seg))
                entry.append((IMAGE, n_images))
                n_images += 1
        if entry:
            samples.append(entry)
        if cfg.max_docs and len(samples) >= cfg.max_docs:
            break
    return samples, texts, n_images


class _ImageWriter:
    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.offsets = [0]

    def write(self, data: bytes) -> None:
        self.file.write(data)


def _tokenizer(cfg: DataConfig, texts: list[str], log) -> KilnTokenizer:
    """`data.tokenizer` when one is given, else a BPE tokenizer trained on the texts."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    log(f"training a byte-level BPE tokenizer (vocabulary {cfg.vocab_size}) on {len(texts)} texts")
    return train_tokenizer(iter(texts), cfg.vocab_size)


def _write_index(
    tmp: Path,
    tok: KilnTokenizer,
    dtype: np.dtype,
    samples: list[list[tuple[int, Any]]],
    texts: list[str],
    image_offsets: list[int],
) -> tuple[list, np.ndarray]:
    """Write text.bin (the texts' tokens) and the index (images.npy, segments.npy, samples.npy);
    returns each text's tokens and the offsets of the texts in text.bin."""
    encoded = tok.encode_batch(texts) if texts else []
    text_starts = np.concatenate([[0], np.cumsum([len(e) for e in encoded], dtype=np.int64)])
    (np.concatenate(encoded).astype(dtype) if encoded else np.zeros(0, dtype)).tofile(tmp / "text.bin")

    segments, offsets = [], [0]
    for entry in samples:
        for kind, ref in entry:
            segments.append((TEXT, int(text_starts[ref]), len(encoded[ref])) if kind == TEXT else (IMAGE, ref, 0))
        offsets.append(len(segments))
    np.save(tmp / "images.npy", np.asarray(image_offsets, dtype=np.int64))
    np.save(tmp / "segments.npy", np.asarray(segments, dtype=np.int64).reshape(-1, 3))
    np.save(tmp / "samples.npy", np.asarray(offsets, dtype=np.int64))
    return encoded, text_starts


def _write_split(
    tmp: Path,
    cfg: DataConfig,
    samples: list[list[tuple[int, Any]]],
    texts: list[str],
    image_offsets: list[int],
    n_images: int,
) -> np.ndarray:
    """Write train.npy and val.npy; returns which samples are in validation."""
    # the split follows each sample's content (its texts and image bytes), not its position
    image_file = np.memmap(tmp / "images.bin", dtype=np.uint8, mode="r") if n_images else None
    keys = []
    for entry in samples:
        h = hashlib.sha256()
        for kind, ref in entry:
            if kind == TEXT:
                h.update(texts[ref].encode("utf-8", "surrogatepass"))
            else:
                assert image_file is not None  # an image segment means n_images > 0
                h.update(image_file[image_offsets[ref] : image_offsets[ref + 1]].tobytes())
        keys.append(h.hexdigest())
    is_val = np.array([_is_val(k, cfg.split_seed, cfg.val_fraction) for k in keys])
    if not is_val.any():
        is_val[min(range(len(keys)), key=lambda i: _split_hash(keys[i], cfg.split_seed))] = True
    if is_val.all():
        is_val[0] = False
    np.save(tmp / "train.npy", np.flatnonzero(~is_val).astype(np.int64))
    np.save(tmp / "val.npy", np.flatnonzero(is_val).astype(np.int64))
    del image_file
    return is_val


def _val_tokens(
    encoded: list, samples: list[list[tuple[int, Any]]], is_val: np.ndarray, tok: KilnTokenizer
) -> list[np.ndarray]:
    """The validation samples' text tokens, and one EOS per validation sample."""
    return [
        np.asarray(encoded[ref], dtype=np.int64)
        for i in np.flatnonzero(is_val)
        for kind, ref in samples[i]
        if kind == TEXT
    ] + [np.full(int(is_val.sum()), tok.eos_id)]


def _manifest(
    cfg: DataConfig,
    key: str,
    tmp: Path,
    tok: KilnTokenizer,
    dtype: np.dtype,
    counts: dict[str, int],
    val_tokens: list[np.ndarray],
    is_val: np.ndarray,
    start: float,
) -> dict[str, Any]:
    """The manifest.json of a dataset built in `tmp`; `counts`: its samples, images, texts and
    text tokens."""
    sha = {name: sha256_file(tmp / name) for name in FILES}
    quick = {name: quick_digest(tmp / name) for name in FILES}
    return {
        "format": FORMAT,
        "key": key,
        "corpus": cfg.corpus,
        "modality": "image-text",
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        **counts,
        "train_samples": int((~is_val).sum()),
        "val_samples": int(is_val.sum()),
        "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction,
        "val_unigram_entropy": unigram_entropy(val_tokens, tok.vocab_size),
        "sha256": sha,
        "quick": quick,
        "content_key": hashlib.sha256("\n".join([tok.sha256] + [sha[n] for n in FILES]).encode()).hexdigest()[:20],
        "seconds": round(time.perf_counter() - start, 2),
    }


def prepare_multimodal(cfg: DataConfig, log=print) -> MultimodalPrepared:
    """Make (or reuse) the prepared image-text dataset for `cfg` and return it, verified."""
    source = resolve_source(cfg)
    key = dataset_key(cfg, source.fingerprint)
    final = Path(cfg.cache_dir).expanduser() / key
    if (final / "manifest.json").is_file():
        return open_multimodal(final)
    writable_cache(cfg)
    start = time.perf_counter()
    with staged(final) as tmp:
        writer = _ImageWriter(tmp / "images.bin")
        try:
            samples, texts, n_images = _read(cfg, source, writer)
        finally:
            writer.file.close()
        if len(samples) < 2:
            raise DataError(
                f"data.corpus = '{cfg.corpus}' holds {len(samples)} image-text sample(s); a train / "
                "validation split needs at least two"
            )
        tok = _tokenizer(cfg, texts, log)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
        encoded, text_starts = _write_index(tmp, tok, dtype, samples, texts, writer.offsets)
        is_val = _write_split(tmp, cfg, samples, texts, writer.offsets, n_images)
        tok.save(tmp / "tokenizer.json")
        counts = {
            "samples": len(samples),
            "images": n_images,
            "texts": len(texts),
            "text_tokens": int(text_starts[-1]),
        }
        manifest = _manifest(
            cfg, key, tmp, tok, dtype, counts, _val_tokens(encoded, samples, is_val, tok), is_val, start
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(
        f"prepared {manifest['train_samples']} + {manifest['val_samples']} image-text samples ({n_images} images, "
        f"{manifest['text_tokens']:,} text tokens) in {manifest['seconds']:.1f}s -> {final}"
    )
    return open_multimodal(final)
