"""Mixture of experts against the dense model of equal active parameters, at equal tokens, on
the stdlib corpus: `moe-tiny` (8 experts of hidden 192, top-2) vs `tiny` (one MLP of hidden
384), both fp32 (so the comparison means the same on CPUs with and without fast bf16), the same
seed, data order and schedule. Prints validation loss, tokens/s and each MoE layer's expert
load (max / mean) over the run's last quarter.

    python bench/moe_vs_dense.py --steps 300 [--only 0,1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = [
    ("dense tiny", "tiny", []),
    ("moe-tiny (bias 1e-3 + aux 1e-3)", "moe-tiny", []),
    ("moe-tiny, bias only", "moe-tiny", ["model.moe_aux_loss=0"]),
    ("moe-tiny, no balancing", "moe-tiny", ["model.moe_aux_loss=0", "model.moe_bias_rate=0"]),
]


def run(preset: str, sets: list[str], steps: int, workdir: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "kiln", "train", "--preset", preset, "--runs-dir", str(workdir), "--name", name]
    for s in [
        f"train.steps={steps}",
        "train.time_budget_s=0",
        "train.precision=fp32",
        "eval.every=0",
        "eval.batches=16",
        "checkpoint.every=0",
        "log.every=10",
        "log.plot=false",
        "eval.sample_tokens=1",
        *sets,
    ]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=dict(os.environ, KILN_QUIET="1"), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((workdir / name / "summary.json").read_text())
    records = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    tail = records[-max(1, len(records) // 4) :]
    loads = {k.split("/")[1]: sum(r[k] for r in tail) / len(tail) for k in tail[-1] if k.endswith("load_max_mean")}
    dropped = max((r[k] for r in tail for k in r if k.endswith("/dropped")), default=0.0)
    return {
        "val_loss": summary["val_loss"],
        "tokens": summary.get("tokens"),
        "tokens_per_s": summary["tokens_per_s"],
        "load_max_mean": loads,
        "dropped": dropped,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json")
    ap.add_argument("--only", help="comma-separated indices of the variants to run (default: all)")
    args = ap.parse_args()
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(VARIANTS))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in chosen:
            label, preset, sets = VARIANTS[i]
            rows[label] = run(preset, sets, args.steps, Path(tmp), f"v{i}")
            r = rows[label]
            loads = ", ".join(f"{k} {v:.2f}" for k, v in r["load_max_mean"].items()) or "-"
            print(
                f"{label:<34} val {r['val_loss']:.4f}  {r['tokens_per_s']:>7,.0f} tok/s  load max/mean: {loads}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
