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

from torch.profiler import profile

from kiln.config import load_config
from kiln.data.shards import prepare
from kiln.parallel.runtime import Parallel
from kiln.runs.rundir import RunDir
from kiln.train.build import build_trainer
from kiln.train.precision import resolve_device
from kiln.train.resolve import check_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=3, help="0 = no profiler table")
    args = ap.parse_args()
    os.environ.setdefault("KILN_QUIET", "1")
    cfg = load_config(args.preset, overrides=["train.time_budget_s=0", *args.overrides])
    spec = check_training(cfg)
    data = prepare(cfg.data)
    par = Parallel.setup(cfg, resolve_device(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, spec, RunDir.create(Path(tmp), "profile", cfg), data, par)
        trainer.callbacks.on_run_start(trainer)

        def step() -> object:
            result = trainer.train_step()
            trainer.step += 1
            return result

        for _ in range(args.warmup):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            result = step()
        result.loss.item()
        per_step = (time.perf_counter() - start) / args.steps
        tokens = cfg.global_batch * cfg.model.seq_len
        print(
            f"{per_step:.3f} s/step, {tokens / per_step:,.0f} tokens/s ({trainer.precision}, "
            f"compile={cfg.train.compile})"
        )
        if args.profile_steps:
            with profile() as prof:
                for _ in range(args.profile_steps):
                    step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
