"""Run `kiln` with a fault injected: the process SIGKILLs itself at a chosen moment.

    python killer.py MODE N -- <kiln arguments>

MODE: step (after optimizer step N is logged), save_file (at the N-th safetensors write of a
checkpoint), fsync (at the N-th fsync, i.e. while a checkpoint is being committed), prepare
(while tokenising the corpus), metrics (half-way through writing metrics record N), hang (sleep
forever at step N), none. Under torchrun only rank RANK_TO_KILL (default 1) is hit, and only on
the first attempt (TORCHELASTIC_RESTART_COUNT == 0).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    sep = sys.argv.index("--")
    mode, n = sys.argv[1], int(sys.argv[2])
    kiln_args = sys.argv[sep + 1:]
    armed = (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
             and os.environ.get("RANK", "0") == os.environ.get("RANK_TO_KILL", os.environ.get("RANK", "0")))

    import kiln.data.shards as shards
    import kiln.runs.rundir as rundir
    import kiln.train.checkpoint as checkpoint
    import kiln.train.trainer as trainer

    calls = {"n": 0}

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if armed and calls["n"] == n:
                die()
            return fn(*args, **kwargs)
        return wrapped

    if mode == "save_file":
        checkpoint.save_file = counting(checkpoint.save_file)
    elif mode == "fsync":
        checkpoint.fsync_path = counting(checkpoint.fsync_path)
    elif mode == "prepare" and armed:
        original = shards._encode_split

        def encode_then_die(texts, tok, dtype, out, prefix, label):
            result = original(texts, tok, dtype, out, prefix, label)
            die()
            return result
        shards._encode_split = encode_then_die
    elif mode == "metrics" and armed:
        original_log = rundir.RunDir.log_metrics

        def log_then_die(self, record):
            if record["step"] == n:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record)[:20])  # a torn line
                die()
            original_log(self, record)
        rundir.RunDir.log_metrics = log_then_die
    elif mode in ("step", "hang") and armed:
        original_call = trainer.Trainer._call

        def call(self, hook, *args):
            original_call(self, hook, *args)
            if hook == "on_step_end" and args[0]["step"] == n:
                if mode == "hang":
                    time.sleep(3600)
                die()
        trainer.Trainer._call = call

    from kiln.cli import main as kiln_main

    return kiln_main(kiln_args)


if __name__ == "__main__":
    sys.exit(main())
