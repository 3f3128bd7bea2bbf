"""A plugin for the checkpoint-verification tests: logs every file Kiln hashes as
`<phase> <rank> <path>` lines in KILN_HASH_LOG/rank<rank>.txt (phase: load inside
Checkpointer.load, else save), so a test can tell which rank read which checkpoint file."""

from __future__ import annotations

import os
from pathlib import Path

import kiln.fileio as fileio
from kiln.train.checkpoint import Checkpointer

RANK = os.environ.get("RANK", "0")
phase = {"now": "save"}
_hash, _load = fileio.checksum_file, Checkpointer.load


def _log(path: Path) -> None:
    folder = Path(os.environ["KILN_HASH_LOG"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{RANK}.txt", "a") as f:
        f.write(f"{phase['now']} {RANK} {path}\n")


def logged_hash(path: Path, algorithm: str = "") -> str:
    _log(Path(path))
    return _hash(path, algorithm)


def logged_load(self, *args, **kwargs):
    phase["now"] = "load"
    try:
        return _load(self, *args, **kwargs)
    finally:
        phase["now"] = "save"


fileio.checksum_file = logged_hash
Checkpointer.load = logged_load
