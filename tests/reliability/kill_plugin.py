"""A Kiln plugin that SIGKILLs the process at a chosen moment, for the kill -9 tests.

    KILN_KILL=MODE:N kiln train --plugin kill_plugin.py [--set 'callbacks.enabled=["kill"]'] ...

MODE: step (once step N is logged) and hang (sleep forever inside step N) come from the `kill`
callback, which the run must enable; save_file (at the N-th safetensors write of a checkpoint),
fsync (at the N-th fsync, i.e. while a checkpoint is being committed), prepare (while tokenising
the corpus) and metrics (half-way through writing metrics record N) interrupt Kiln's own file
writes, which no callback can reach, so they wrap those functions. Under torchrun only rank
RANK_TO_KILL (default 1) is hit, and only on the first attempt. Without KILN_KILL nothing happens.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import kiln.data.stream as stream
import kiln.runfolder.folder as runfolder
import kiln.train.checkpoint as checkpoint
from kiln.train.callbacks import Callback, register_callback

MODE, _, N = os.environ.get("KILN_KILL", "none:0").partition(":")
N = int(N or 0)
ARMED = (
    MODE != "none"
    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    and os.environ.get("RANK", "0") == os.environ.get("RANK_TO_KILL", os.environ.get("RANK", "0"))
)


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@register_callback("kill")
class Kill(Callback):
    """Kills (or hangs) the process once step N is logged (KILN_KILL=step:N or hang:N)."""

    order = 99  # after the metrics writer: the step's record is on disk

    def on_after_backward(self, trainer, step):
        if ARMED and MODE == "hang" and step + 1 == N:
            time.sleep(3600)  # inside step N: the watchdog judges it against the step times

    def on_log(self, trainer, record):
        if ARMED and MODE == "step" and record["step"] == N:
            die()


calls = {"n": 0}


def counting(fn):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if ARMED and calls["n"] == N:
            die()
        return fn(*args, **kwargs)

    return wrapped


if ARMED and MODE == "save_file":
    checkpoint.save_file = counting(checkpoint.save_file)
elif ARMED and MODE == "fsync":
    checkpoint.fsync_path = counting(checkpoint.fsync_path)
elif ARMED and MODE == "prepare":
    original = stream.encode_stream  # every shard written, the manifest not yet

    def encode_then_die(*args, **kwargs):
        result = original(*args, **kwargs)
        die()
        return result

    stream.encode_stream = encode_then_die
elif ARMED and MODE == "metrics":
    original_log = runfolder.RunFolder.log_metrics

    def log_then_die(self, record):
        if record["step"] == N:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record)[:20])  # a torn line
            die()
        original_log(self, record)

    runfolder.RunFolder.log_metrics = log_then_die
