"""The last record of a JSONL log, read from its end: what `kiln runs` needs of a run's metrics
without reading a million lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BLOCK = 1 << 16


def last_record(path: Path) -> dict[str, Any] | None:
    """The last line of the log that is a JSON object (a line still being written, or cut
    short by a kill, is skipped as RunFolder.read_jsonl skips it), or None. Unlike read_jsonl it
    does not see a damaged line earlier in the file: it reads only the end."""
    try:
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        pending = b""  # the start of a line whose beginning lies in an earlier block
        while end > 0:
            start = max(0, end - BLOCK)
            f.seek(start)
            data = f.read(end - start) + pending
            lines = data.split(b"\n")
            pending = lines.pop(0) if start > 0 else b""  # may be a line's tail: read on
            for line in reversed(lines):
                record = _record(line)
                if record is not None:
                    return record
            end = start
        return _record(pending)


def _record(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None
