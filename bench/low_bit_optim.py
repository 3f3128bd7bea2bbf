"""Low-bit AdamW states against float32 states on the tiny preset (stdlib corpus, fp32 compute,
the same seed, data order and schedule): final validation loss, the optimizer state's size as
checkpointed (optimizer.safetensors, which holds exactly the state tensors) and tokens/s.

    python bench/low_bit_optim.py --steps 400 [--json OUT] [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")


def run(optim: str, steps: int, workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "kiln", "train", "--preset", "tiny", "--runs-dir", str(workdir), "--name", optim]
    for s in [
        f"train.steps={steps}",
        "train.time_budget_s=0",
        "train.precision=fp32",
        "eval.every=0",
        "eval.batches=16",
        f"checkpoint.every={steps}",
        "log.plot=false",
        "eval.sample_tokens=1",
        f"optim.name={optim}",
    ]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=dict(os.environ, KILN_QUIET="1"), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{optim} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((workdir / optim / "summary.json").read_text())
    state = workdir / optim / "checkpoints" / f"step-{steps:08d}" / "optimizer.safetensors"
    return {
        "optimizer": optim,
        "val_loss": summary["val_loss"],
        "state_bytes": state.stat().st_size,
        "tokens_per_s": summary["tokens_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--json")
    ap.add_argument("--runs", help="keep the runs in this folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(o, args.steps, Path(args.runs or tmp)) for o in OPTIMIZERS]
    base = rows[0]
    print(f"{'optimizer':<10} {'val loss':>9} {'vs fp32':>8} {'state MiB':>10} {'vs fp32':>8} {'tokens/s':>9}")
    for r in rows:
        print(
            f"{r['optimizer']:<10} {r['val_loss']:9.4f} {r['val_loss'] / base['val_loss'] - 1:+8.2%} "
            f"{r['state_bytes'] / 2**20:10.2f} {r['state_bytes'] / base['state_bytes']:8.1%} "
            f"{r['tokens_per_s']:9,.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
