"""Training throughput: tokens/s, achieved TFLOP/s, MFU and peak memory of a preset, for one or
more variants side by side in one invocation (each in its own process, so peaks and compile
caches do not leak between them).

    python bench/throughput.py --preset tiny --steps 40 \
        --set model.d_model=256 --set model.n_layers=4 --set model.seq_len=256 --set train.batch_size=16 \
        --variant fp32-eager:train.precision=fp32,train.compile=false \
        --variant bf16-compile:train.precision=bf16,train.compile=true

Numbers exclude the first logging interval (warm-up and compilation) and evaluation time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_VARIANTS = [
    "fp32-eager:train.precision=fp32,train.compile=false",
    "bf16-eager:train.precision=bf16,train.compile=false",
    "bf16-compile:train.precision=bf16,train.compile=true",
]


def run_variant(preset: str, steps: int, common: list[str], variant: str, workdir: Path) -> dict:
    name, _, spec = variant.partition(":")
    sets = [s for s in spec.split(",") if s]
    log_every = max(1, steps // 5)
    cmd = [
        sys.executable,
        "-m",
        "kiln",
        "train",
        "--preset",
        preset,
        "--runs-dir",
        str(workdir),
        "--name",
        name,
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.time_budget_s=0",
        "--set",
        f"log.every={log_every}",
        "--set",
        "eval.every=0",
        "--set",
        "checkpoint.every=0",
        "--set",
        "eval.sample_tokens=1",
        "--set",
        "log.plot=false",
        "--set",
        "schedule.warmup_steps=1",
    ]
    for s in common + sets:
        cmd += ["--set", s]
    env = dict(os.environ, KILN_QUIET="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((workdir / name / "summary.json").read_text())
    return {"variant": name, **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", dest="common", action="append", default=[], help="override for every variant")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    variants = args.variant or DEFAULT_VARIANTS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            rows.append(run_variant(args.preset, args.steps, args.common, v, Path(tmp)))
            r = rows[-1]
            print(f"  done {r['variant']}: {r['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    base = rows[0]["tflops"]
    print(f"\npreset {args.preset} {' '.join(args.common)}; {args.steps} steps; device {rows[0]['device']}")
    print(f"{'variant':<18}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'vs first':>10}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "unknown"
        print(
            f"{r['variant']:<18}{r['tokens_per_s']:>11,.0f}{r['tflops']:>10.3f}{mfu:>8}"
            f"{r['peak_mem_gb']:>10.2f}{r['tflops'] / base:>9.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
