"""Whether a run is alive: the status file a training process keeps, and how a reader tells a
running run from one whose process was killed.

The training process (rank 0) writes `status.json` when it starts, at every logging step (a
heartbeat) and when it ends. A kill -9 leaves "running" behind; a reader on the same host then
checks whether that pid still exists and is the same process (its start time), and a reader on
another host trusts the heartbeat only while it is fresh.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

STALE_S = 30 * 60  # a heartbeat older than this on another host: the run is presumed dead
STATES = ("created", "running", "finished", "failed", "stopped", "interrupted")


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_record(step: int, started: float) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "state": "running",
        "pid": pid,
        "pid_start": process_start(pid),
        "host": socket.gethostname(),
        "started": started,
        "heartbeat": time.time(),
        "step": step,
    }


def resolve_status(saved: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """`saved` with "running" turned into "interrupted" when its process is gone."""
    out = dict(saved)
    if out.get("state") != "running":
        return out
    now = time.time() if now is None else now
    if out.get("host") == socket.gethostname() and out.get("pid"):
        pid = int(out["pid"])
        alive = pid_alive(pid) and (out.get("pid_start") is None or process_start(pid) == out["pid_start"])
    else:
        alive = now - float(out.get("heartbeat", 0)) < STALE_S
    if not alive:
        out["state"] = "interrupted"
        out["reason"] = "its process is gone (killed or crashed without a word)"
    return out
