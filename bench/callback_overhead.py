"""The cost of each monitoring callback: the same short run with none, then with each one on,
alternated twice in one invocation (this 2-core VM drifts by 10-15% between minutes, so compare
inside one invocation). Prints tokens/s and the slowdown against the mean of the `off` runs.

    python bench/callback_overhead.py --steps 60 [--set model.d_model=256 ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from throughput import run_variant

VARIANTS = [
    "off:",
    'layer_stats-every-10:callbacks.enabled=["layer_stats"],callbacks.layer_stats.every=10',
    'layer_stats-every-1:callbacks.enabled=["layer_stats"],callbacks.layer_stats.every=1',
    'step_time:callbacks.enabled=["step_time"]',
    'memory:callbacks.enabled=["memory"]',
    'tensorboard:callbacks.enabled=["tensorboard"]',
    'wandb-offline:callbacks.enabled=["wandb"]',
    # 5 of the measured steps profiled (the trace written after step 30): what a profiled range costs a run
    'profiler-5-steps:callbacks.enabled=["profiler"],callbacks.profiler.start=25,callbacks.profiler.steps=5',
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--set", dest="common", action="append", default=[])
    args = ap.parse_args()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in ("a", "b"):
            for v in VARIANTS:
                name, _, spec = v.partition(":")
                out = run_variant(args.preset, args.steps, args.common, f"{name}-{rep}:{spec}", Path(tmp))
                rows.append((f"{name} ({rep})", out["tokens_per_s"]))
    base = sum(r for n, r in rows if n.startswith("off ")) / 2
    print(f"{'variant':<26} {'tokens/s':>10} {'vs off':>8}")
    for name, rate in rows:
        print(f"{name:<26} {rate:>10,.0f} {rate / base - 1:>+8.1%}")


if __name__ == "__main__":
    main()
