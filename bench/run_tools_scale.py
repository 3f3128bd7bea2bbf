"""The run tools on a long run: a folder holding a run of 1,000,000 logged steps (a ~190 MB
metrics.jsonl, every key the trainer logs), 1,000 evaluations (eval.jsonl and an
eval/step-<N>.json report each, as a run with `eval.suites = ["lm"]` writes them), a hundred
events, and a short run beside it. Times `kiln runs`, `kiln doctor`, `kiln report` and
`kiln compare` (the long run against the short one) as separate processes, each cold (no
columnar cache of metrics.jsonl yet: the first call builds it) and then warm, with each
process's peak resident memory (its own rusage, from wait4). Prints a markdown table.

    python bench/run_tools_scale.py [--records 1000000] [--evals 1000] [--keep DIR]

The machine's other work shows in the times: compare numbers from one invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE_NAMES = (".metrics-cache", ".eval-cache")  # what the columnar reader keeps beside a run's logs


def write_run(folder: Path, records: int, evals: int, seed: int) -> None:
    """A finished run of `records` logged steps with `evals` evaluations spread over them; the loss
    has a NaN step and a spike (so the doctor has something to say), the LR a warm-up and a cosine."""
    from kiln.config import load_config, to_toml

    folder.mkdir(parents=True)
    cfg = load_config(
        preset="tiny",
        overrides=[
            f"train.steps={records}",
            f"eval.every={max(1, records // max(evals, 1))}",
            "schedule.warmup_steps=2000",
        ],
    )
    (folder / "config.toml").write_text(to_toml(cfg))
    (folder / "run.json").write_text(json.dumps({"name": folder.name, "created": "2026-01-05T10:00:00+0000"}))
    rnd = random.Random(seed)
    peak, warmup, tokens_per_step = cfg.optim.lr, 2000, 4096
    nan_step, spike_step = records // 3, records // 2
    with open(folder / "metrics.jsonl", "w") as f:
        buf = []
        for s in range(1, records + 1):
            lr = peak * s / warmup if s <= warmup else peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / records))
            loss = 2.5 + 5.0 * math.exp(-s / (records / 8)) + rnd.gauss(0, 0.03)
            if s == nan_step:
                loss = math.nan
            elif s == spike_step:
                loss *= 2.5
            tps = 16000 + rnd.random() * 800
            buf.append(
                json.dumps(
                    {
                        "step": s,
                        "tokens": s * tokens_per_step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": 0.4 + rnd.random() * 0.2,
                        "mfu": tps / 50000,
                        "peak_mem_gb": 0.86,
                        "tokens_per_s": tps,
                    }
                )
            )
            if len(buf) == 10000:
                f.write("\n".join(buf) + "\n")
                buf = []
        if buf:
            f.write("\n".join(buf) + "\n")
    every = max(1, records // max(evals, 1))
    (folder / "eval").mkdir()
    with open(folder / "eval.jsonl", "w") as f:
        for i in range(1, evals + 1):
            step = i * every
            val = 2.6 + 5.0 * math.exp(-step / (records / 8)) + rnd.gauss(0, 0.01)
            suite = {"loss": val, "ppl": math.exp(val), "acc": 0.3, "top5_acc": 0.5, "bits_per_byte": val / 2.3}
            suite |= {"tokens": 32768, "bytes": 115638}
            record = {"step": step, "tokens": step * tokens_per_step, "val_loss": val, "val_ppl": math.exp(val)}
            record |= {"val_acc": 0.3, "val_tokens": 32768, **{f"lm/{k}": v for k, v in suite.items()}}
            f.write(json.dumps(record) + "\n")
            report = {"run": folder.name, "step": step, "suites": {"lm": suite}, "skipped": {}, "seconds": {"lm": 0.9}}
            (folder / "eval" / f"step-{step}.json").write_text(json.dumps(report | {"artifacts": {}}, indent=2))
    with open(folder / "events.jsonl", "w") as f:
        f.write(
            json.dumps({"step": 11, "kind": "time_budget", "budget_s": 1e9, "spent_s": 2.7, "steps": records}) + "\n"
        )
        f.write(
            json.dumps({"step": nan_step, "kind": "nonfinite", "data_index": nan_step - 1, "action": "skip"}) + "\n"
        )
        for s in range(records // 100, records + 1, records // 100):  # a save every 1% of the run (issue 34, item 1)
            event = {"step": s, "kind": "checkpoint", "bytes": 11_000_000, "seconds": 0.2, "hash_seconds": 0.01}
            f.write(json.dumps(event | {"blocking_seconds": 0.2}) + "\n")
    summary = {"steps": records, "tokens": records * tokens_per_step, "train_loss": 2.5, "unigram_entropy": 6.47}
    summary |= {"params": 950912, "val_loss": 2.6, "tokens_per_s": 16400.0, "mfu": 0.33, "seconds": records * 0.25}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "status.json").write_text(json.dumps({"state": "finished", "step": records, "active_s": records * 0.25}))


def run_kiln(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of one `kiln` process (its own rusage, not the maximum
    over every child this bench has waited for)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and proc.stderr is not None:
        print(f"kiln {' '.join(argv)} exited {code}: {proc.stderr.read()[-2000:]}", file=sys.stderr)
    return seconds, usage.ru_maxrss / 1024, code


def drop_caches(runs: Path, user_cache: Path) -> None:
    """Forget every columnar copy, beside the runs and in the (bench's own) user cache folder."""
    for run in runs.iterdir():
        for name in CACHE_NAMES:
            shutil.rmtree(run / name, ignore_errors=True)
    shutil.rmtree(user_cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--evals", type=int, default=1000)
    ap.add_argument("--short", type=int, default=2000, help="logged steps of the short run beside it")
    ap.add_argument("--keep", metavar="DIR", help="build the folder here and keep it (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kiln-run-tools-"))
    runs = root / "runs"
    try:
        if not (runs / "long" / "status.json").is_file():
            t = time.perf_counter()
            write_run(runs / "long", args.records, args.evals, seed=0)
            write_run(runs / "short", args.short, max(1, args.evals // 50), seed=1)
            size = (runs / "long" / "metrics.jsonl").stat().st_size
            print(f"built {runs} in {time.perf_counter() - t:.0f}s: metrics.jsonl {size / 1e6:.0f} MB", file=sys.stderr)
        long, short = str(runs / "long"), str(runs / "short")
        commands = [
            ("kiln runs", ["runs", str(runs)], 1.0),
            ("kiln doctor", ["doctor", long], 10.0),
            ("kiln report", ["report", long, "--out", str(root / "report")], 15.0),
            ("kiln compare", ["compare", long, short, "--out", str(root / "compare")], 10.0),
        ]
        user_cache = root / "user-cache"  # where copies go for read-only folders: not the user's own
        env = {**os.environ, "XDG_CACHE_HOME": str(user_cache)}
        rows = []
        for label, argv, target in commands:
            drop_caches(runs, user_cache)
            cold = run_kiln(argv, env)
            warm = run_kiln(argv, env)
            rows.append((label, cold, warm, target))
            print(
                f"{label}: cold {cold[0]:.2f}s {cold[1]:.0f} MB, warm {warm[0]:.2f}s {warm[1]:.0f} MB", file=sys.stderr
            )
        cpus = os.cpu_count()
        print(f"\n{args.records:,} metric records, {args.evals:,} evaluations ({cpus} CPUs; times may be noisy)\n")
        print("| command | cold: time | cold: peak memory | warm: time | warm: peak memory | target |")
        print("|---|---|---|---|---|---|")
        for label, cold, warm, target in rows:
            failed = " (failed)" if cold[2] or warm[2] else ""
            print(
                f"| `{label}`{failed} | {cold[0]:.2f} s | {cold[1]:.0f} MB | {warm[0]:.2f} s | {warm[1]:.0f} MB "
                f"| ≤ {target:g} s, < 500 MB |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
