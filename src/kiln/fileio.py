"""Small file helpers shared by the data cache and the checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or min(32, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
