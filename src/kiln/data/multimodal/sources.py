"""Image-text sources: where multimodal samples come from.

A sample is a list of segments, each a `str` (text) or `bytes` (an encoded image: PNG, JPEG, ...),
in reading order. An image-caption pair is `[image, caption]`; an interleaved document is any
sequence (text, image, text, ...). `data.corpus` names a registered source or gives paths
(files or directories, comma-separated):

- WebDataset-style `.tar` shards: members are grouped by key (the member name up to the first dot
  of its base name), consecutive members with one key forming one sample. A pair is an image
  member (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`, `.ppm`, `.pgm`, `.gif`) plus a `.txt` (or
  `.caption`) member; an interleaved document is a `.json` member
  `{"segments": [{"text": "..."}, {"image": "0.png"}, ...]}` whose images name members of the
  same key by their suffix (`<key>.0.png`).
- Parquet files: a pair per row from `data.image_field` (binary, or a struct with a `bytes`
  field as Hugging Face datasets store images) and `data.text_field`; when both columns are
  lists, a row is an interleaved document (OBELICS layout: position i holds either a text or an
  image, the other being null).
- `digits`: scikit-learn's 1,797 handwritten digits (8x8, grey), each captioned with its class
  (the `vlm-tiny` demo; needs no download).

Sources are read in a fixed order (sorted paths, file order within), so a prepared dataset does
not depend on the file system's listing order.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from kiln.config import DataConfig
from kiln.errors import DataError

Segment = str | bytes
Sample = list[Segment]

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "gif")
TEXT_SUFFIXES = ("txt", "caption")
FILE_SUFFIXES = (".tar", ".parquet")


class MultimodalSource:
    """A named, fingerprinted iterable of samples."""

    def __init__(self, name: str, fingerprint: str, read: Callable[[], Iterator[Sample]]):
        self.name, self.fingerprint, self._read = name, fingerprint, read

    def samples(self) -> Iterator[Sample]:
        yield from self._read()


MULTIMODAL_SOURCES: dict[str, Callable[[DataConfig], MultimodalSource]] = {}


def register_multimodal_source(name: str):
    """Decorator: `@register_multimodal_source("mine")` makes `data.corpus = "mine"` select it."""

    def wrap(fn: Callable[[DataConfig], MultimodalSource]) -> Callable[[DataConfig], MultimodalSource]:
        MULTIMODAL_SOURCES[name] = fn
        return fn

    return wrap


# ------------------------------------------------------------------ the digits demo

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "a handwritten {name}.",
    "the digit {name}, written by hand.",
    "a small grey picture of a {name}.",
    "this is a {name}.",
)


def digit_caption(label: int, index: int) -> str:
    """The caption of digit sample `index` with class `label` (templates rotate with the index)."""
    return CAPTIONS[index % len(CAPTIONS)].format(name=DIGIT_NAMES[label])


@register_multimodal_source("digits")
def digits_source(cfg: DataConfig) -> MultimodalSource:
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "data.corpus = 'digits' needs scikit-learn; pip install scikit-learn (or pip install 'kiln[vision]')"
        ) from None

    def read() -> Iterator[Sample]:
        from PIL import Image

        digits = load_digits()
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            grey = (pixels * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")  # values 0..16 in the set
            buf = io.BytesIO()
            Image.fromarray(grey, mode="L").save(buf, format="PNG")
            yield [buf.getvalue(), digit_caption(int(label), i)]

    return MultimodalSource("digits", f"digits:sklearn-{sklearn.__version__}", read)


# ------------------------------------------------------------------ files


def _files(spec: str) -> list[Path]:
    found: list[Path] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        path = Path(part).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        elif path.is_file():
            if path.suffix not in FILE_SUFFIXES:
                raise DataError(f"{path} is not an image-text source: expected .tar (WebDataset) or .parquet")
            found.append(path)
        else:
            raise DataError(
                f"data.corpus: {part} is neither a registered image-text source "
                f"({', '.join(MULTIMODAL_SOURCES)}) nor an existing file or directory"
            )
    if not found:
        raise DataError(f"data.corpus = '{spec}' holds no .tar or .parquet files")
    return found


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key / suffix split: `dir/000123.0.png` -> (`dir/000123`, `0.png`)."""
    head, base = os.path.split(name)
    key, dot, suffix = base.partition(".")
    return (os.path.join(head, key) if head else key), suffix.lower()


def _tar_sample(path: Path, key: str, members: dict[str, bytes]) -> Sample:
    where = f"{path} sample '{key}'"
    doc = None
    if "json" in members:
        try:
            doc = json.loads(members["json"])
        except ValueError:
            raise DataError(f"{where}: its .json is not valid JSON") from None
    if isinstance(doc, dict) and "segments" in doc:  # interleaved; any other .json is metadata (img2dataset)
        segments = doc["segments"]
        if not isinstance(segments, list):
            raise DataError(f'{where}: its .json\'s "segments" is not a list')
        out: Sample = []
        for seg in segments:
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                out.append(seg["text"])
            elif isinstance(seg, dict) and isinstance(seg.get("image"), str):
                suffix = seg["image"].lower()
                if suffix not in members:
                    raise DataError(f"{where}: segment image '{seg['image']}' names no member {key}.{seg['image']}")
                out.append(members[suffix])
            else:
                raise DataError(f'{where}: segment {seg!r} is neither {{"text": ...}} nor {{"image": ...}}')
        return out
    images = [members[s] for s in members if s.rsplit(".", 1)[-1] in IMAGE_SUFFIXES]
    texts = [members[s].decode("utf-8", errors="replace") for s in members if s in TEXT_SUFFIXES]
    if not images or not texts:
        raise DataError(
            f"{where} has no image and caption pair (members: {', '.join(sorted(members))}); "
            f"a pair needs one of .{', .'.join(IMAGE_SUFFIXES)} and a .txt"
        )
    return [images[0], texts[0]]


def read_tar(path: Path) -> Iterator[Sample]:
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path} is not a readable tar file ({e})") from None
    with archive:
        key = ""  # the sample being gathered; set before its first member is
        members: dict[str, bytes] = {}
        for info in archive:
            if not info.isfile():
                continue
            k, suffix = _split_name(info.name)
            if k != key and members:
                yield _tar_sample(path, key, members)
                members = {}
            key = k
            data = archive.extractfile(info)
            assert data is not None  # a regular file member (isfile() above) always has a file object
            members[suffix] = data.read()
        if members:
            yield _tar_sample(path, key, members)


def _image_bytes(value, where: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"{where}: the image is {type(value).__name__}, not encoded bytes")
    return bytes(value)


def read_parquet(path: Path, text_field: str, image_field: str) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors are of several types
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    names = table.schema_arrow.names
    for col, key in ((text_field, "data.text_field"), (image_field, "data.image_field")):
        if col not in names:
            raise DataError(f"{path} has no column '{col}' ({key}); its columns: {', '.join(names)}")
    row = 0
    for batch in table.iter_batches(columns=[text_field, image_field], batch_size=1024):
        texts, images = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        for text, image in zip(texts, images):
            where = f"{path} row {row}"
            row += 1
            if isinstance(text, list) or isinstance(image, list):  # interleaved (OBELICS layout)
                if not (isinstance(text, list) and isinstance(image, list) and len(text) == len(image)):
                    raise DataError(
                        f"{where}: interleaved rows need '{text_field}' and '{image_field}' lists of the same length"
                    )
                sample: Sample = []
                for t, im in zip(text, image):
                    if (t is None) == (im is None):
                        raise DataError(f"{where}: each position holds a text or an image, not both or neither")
                    if t is not None and not isinstance(t, str):
                        raise DataError(f"{where}: '{text_field}' holds {type(t).__name__} values, not text")
                    sample.append(t if t is not None else cast(bytes, _image_bytes(im, where)))  # im is not None
                yield sample
            else:
                img = _image_bytes(image, where)
                if img is None or text is None:
                    raise DataError(f"{where} has an empty '{image_field}' or '{text_field}'")
                if not isinstance(text, str):
                    raise DataError(f"{where}: '{text_field}' is {type(text).__name__}, not text")
                yield [img, text]


def resolve_source(cfg: DataConfig) -> MultimodalSource:
    """`data.corpus` as an image-text source."""
    if cfg.corpus in MULTIMODAL_SOURCES:
        return MULTIMODAL_SOURCES[cfg.corpus](cfg)
    files = _files(cfg.corpus)
    fingerprint = ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)

    def read() -> Iterator[Sample]:
        for path in files:
            if path.suffix == ".tar":
                yield from read_tar(path)
            else:
                yield from read_parquet(path, cfg.text_field, cfg.image_field)

    return MultimodalSource(cfg.corpus, fingerprint, read)
