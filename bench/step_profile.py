"""Time the trainer's step in isolation (no logging, evaluation or checkpoints) and show where
the time goes with torch.profiler.

    python bench/step_profile.py --preset tiny --set train.precision=bf16 --set train.compile=true
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import profile

from kiln.config import load_config
from kiln.data.shards import prepare
from kiln.parallel.runtime import Parallel
from kiln.runs.rundir import RunDir
from kiln.train.precision import resolve_device
from kiln.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=3, help="0 = no profiler table")
    args = ap.parse_args()
    os.environ.setdefault("KILN_QUIET", "1")
    cfg = load_config(args.preset, overrides=args.overrides)
    data = prepare(cfg.data)
    par = Parallel.setup(cfg, resolve_device(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer.build(cfg, RunDir.create(Path(tmp), "profile", cfg), data, par)
        step = 0
        for step in range(args.warmup):
            trainer.train_step(step)
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            result = trainer.train_step(step)
        result.loss.item()
        per_step = (time.perf_counter() - start) / args.steps
        tokens = cfg.global_batch * cfg.model.seq_len
        print(f"{per_step:.3f} s/step, {tokens / per_step:,.0f} tokens/s ({trainer.precision}, "
              f"compile={cfg.train.compile})")
        if args.profile_steps:
            with profile() as prof:
                for s in range(step + 1, step + 1 + args.profile_steps):
                    trainer.train_step(s)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
