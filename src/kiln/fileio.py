"""Small file helpers shared by the data cache and the checkpoints."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from kiln.errors import CheckpointError

try:  # xxh3: ~10x sha256's speed, so a checkpoint's checksums cost a fraction of its write
    import xxhash
except ImportError:  # an install without it writes sha256 (the manifest names the algorithm)
    xxhash = None  # type: ignore[assignment]  # the dependency may be missing where wheels are carried by hand


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to, moved onto `path` when the block ends normally
    and removed when it fails: readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """`data` into `path`, atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def sha256_file(path: Path) -> str:
    return checksum_file(path, "sha256")


# Checkpoint manifests name their checksum per file ({"xxh3_128": ..., "bytes": ...}); data shards
# keep sha256. xxh3 is not cryptographic: it guards against corruption (torn writes, flipped bits,
# a truncated or swapped file), which is what a checkpoint's checksum is for.
CHECKSUMS = ("xxh3_128", "sha256")  # what a manifest entry may carry, preferred first
CHECKSUM = "xxh3_128" if xxhash is not None else "sha256"  # what new manifests record


def _hasher(algorithm: str) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        if xxhash is None:
            raise CheckpointError("this checkpoint's checksums are xxh3_128, and xxhash is missing: pip install xxhash")
        return xxhash.xxh3_128()
    raise ValueError(f"unknown checksum {algorithm!r} (known: {', '.join(CHECKSUMS)})")


def checksum_file(path: Path, algorithm: str = "") -> str:
    """The hex digest of a file by `algorithm` (default CHECKSUM), read 4 MiB at a time (both
    hashes release the GIL on large buffers, so threads hash files side by side)."""
    h = _hasher(algorithm or CHECKSUM)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded_checksum(entry: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, digest) of a manifest entry, whichever known checksum it carries."""
    for algorithm in CHECKSUMS:
        if algorithm in entry:
            return algorithm, str(entry[algorithm])
    raise ValueError(f"no known checksum in {sorted(entry)}")


def checksum_files(paths: list[Path], algorithms: list[str] | None = None, workers: int = 0) -> list[str]:
    """Each file's digest (by its entry of `algorithms`, default CHECKSUM), several at a time."""
    algorithms = algorithms or [""] * len(paths)
    with ThreadPoolExecutor(max_workers=workers or min(32, os.cpu_count() or 1)) as pool:
        return list(pool.map(checksum_file, paths, algorithms))


QUICK_BYTES = 1 << 20  # the head and the tail a quick check reads


def quick_digest(path: Path) -> str:
    """sha256 of a file's size, its first and its last QUICK_BYTES: constant time whatever the
    size, and it catches truncation, a partial write's zeros at either end and a swapped file
    (not a flipped bit in the middle: `sha256_file` does)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(QUICK_BYTES))
        if size > QUICK_BYTES:
            f.seek(max(QUICK_BYTES, size - QUICK_BYTES))
            h.update(f.read(QUICK_BYTES))
    return h.hexdigest()


def sha256_files(paths: list[Path], workers: int = 0) -> list[str]:
    """sha256 of each file, several at a time (hashlib releases the GIL on large reads)."""
    return checksum_files(paths, ["sha256"] * len(paths), workers)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn: Callable[[Path], object], path: Path) -> tuple[object, float]:
    out = fn(path)
    return out, time.perf_counter()


class FlushAndHash:
    """Flush (fsync) and checksum (`algorithm`, default CHECKSUM) files as soon as each is
    written, on threads: a file is hashed from the page cache while the disk is still taking it,
    so its checksum costs time only where hashing outlasts the flushing, and no file waits for
    the last one to be written.

        with FlushAndHash(fsync_path) as files:
            files.add(a); ...; files.add(b)
            digests, extra_seconds = files.finish()
    """

    def __init__(self, fsync: Callable[[Path], None] = fsync_path, hash_workers: int = 0, algorithm: str = ""):
        self._fsync = fsync
        self.algorithm = algorithm or CHECKSUM
        self._flushers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-fsync")  # waits on the disk
        cores = os.cpu_count() or 1
        self._hashers = ThreadPoolExecutor(max_workers=hash_workers or min(4, cores), thread_name_prefix="kiln-sha")
        self._jobs: list[tuple[Path, Future, Future]] = []

    def __contains__(self, path: object) -> bool:
        return any(path == added for added, _, _ in self._jobs)

    def add(self, path: Path) -> None:
        """Start flushing and hashing `path` (written and closed)."""
        flushed = self._flushers.submit(_timed, self._fsync, path)
        hashed = self._hashers.submit(_timed, lambda p: checksum_file(p, self.algorithm), path)
        self._jobs.append((path, flushed, hashed))

    def finish(self) -> tuple[dict[Path, str], float]:
        """Wait for every file: ({path: digest}, seconds the hashing went on after the last
        flush ended, i.e. what the checksums added to the write)."""
        flushed_at, hashed_at, digests = time.perf_counter(), 0.0, {}
        for _, flushed, _ in self._jobs:
            flushed_at = max(flushed_at, flushed.result()[1])
        for path, _, hashed in self._jobs:
            digest, at = hashed.result()
            digests[path] = str(digest)
            hashed_at = max(hashed_at, at)
        return digests, max(0.0, hashed_at - flushed_at)

    def close(self) -> None:
        """Stop (a failed write's files are not worth finishing)."""
        self._flushers.shutdown(wait=True, cancel_futures=True)
        self._hashers.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FlushAndHash:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
