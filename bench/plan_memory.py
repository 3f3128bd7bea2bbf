"""The planner's memory model against PyTorch's FSDPMemTracker / MemTracker (fake tensors, a
fake process group: no device needed) over layouts of the presets: predicted vs measured peak
per rank, the median and worst error.

    python bench/plan_memory.py [--json OUT] [--quick]

Each layout is measured in a process of its own (the fake process group is process-wide).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 50257
# (preset, dp_shard, tp, activation checkpointing, micro-batch, accumulation, precision, tied embeddings)
CASES = [
    ("gpt2-124m", 1, 1, "none", 2, 1, "fp32", True),
    ("gpt2-124m", 2, 1, "none", 2, 1, "fp32", True),
    ("gpt2-124m", 4, 1, "none", 1, 1, "fp32", True),
    ("gpt2-124m", 8, 1, "none", 4, 1, "fp32", True),
    ("gpt2-124m", 4, 1, "full", 2, 1, "fp32", True),
    ("gpt2-124m", 8, 1, "full", 8, 1, "fp32", True),
    ("gpt2-124m", 2, 1, "selective", 1, 1, "fp32", True),
    ("gpt2-124m", 4, 1, "selective", 4, 1, "fp32", True),
    ("gpt2-124m", 4, 1, "none", 2, 2, "fp32", True),
    ("gpt2-124m", 8, 1, "full", 2, 4, "fp32", True),
    ("gpt2-124m", 4, 1, "none", 2, 1, "bf16", True),
    ("gpt2-124m", 8, 1, "full", 4, 1, "bf16", True),
    ("gpt2-124m", 2, 2, "none", 2, 1, "fp32", False),
    ("gpt2-124m", 4, 2, "full", 2, 1, "fp32", False),
    ("gpt2-124m", 2, 4, "none", 2, 1, "fp32", False),
    ("gpt2-124m", 1, 2, "none", 2, 1, "fp32", False),
    ("gpt2-124m", 1, 4, "none", 1, 1, "fp32", False),
    ("gpt2-124m", 2, 2, "selective", 4, 1, "bf16", False),
    ("gpt2-124m", 4, 2, "none", 1, 2, "fp32", False),
    ("gpt2-124m", 1, 1, "full", 4, 1, "fp32", False),
    ("llama-1b", 8, 1, "none", 1, 1, "fp32", True),
    ("llama-1b", 8, 1, "full", 2, 1, "fp32", True),
    ("llama-1b", 4, 1, "selective", 1, 1, "bf16", True),
    ("llama-1b", 8, 1, "full", 4, 1, "bf16", True),
    ("llama-1b", 4, 2, "none", 1, 1, "fp32", False),
    ("llama-1b", 2, 4, "full", 2, 1, "bf16", False),
    ("llama-1b", 1, 8, "none", 1, 1, "bf16", False),
    ("llama-1b", 8, 1, "none", 1, 2, "bf16", True),
    ("tiny", 2, 1, "none", 8, 1, "fp32", True),
    ("tiny", 4, 1, "full", 16, 1, "fp32", True),
    ("tiny", 2, 2, "none", 4, 1, "fp32", False),
    ("tiny", 1, 1, "selective", 8, 2, "fp32", True),
]
QUICK = [CASES[i] for i in (1, 4, 12, 28)]


def one(case: list) -> dict:
    """Measure and predict one layout (run in its own process)."""
    sys.path.insert(0, str(ROOT / "src"))
    from kiln.config import load_config
    from kiln.plan.layout import Layout
    from kiln.plan.peak_memory import model_facts, peak_memory
    from kiln.plan.tracker import measured_peak

    preset, shard, tp, ac, mb, accum, precision, tied = case
    cfg = load_config(
        preset,
        overrides=[f"train.precision={precision}", f"model.tie_embeddings={str(tied).lower()}", "model.dropout=0"],
    )
    layout = Layout(1, shard, tp, 1, mb, accum, ac)
    measured = measured_peak(cfg, layout, VOCAB)["Total"]
    predicted = peak_memory(model_facts(cfg, VOCAB, precision), layout)
    return {
        "case": case,
        "measured": measured,
        "predicted": predicted.total,
        "phase": predicted.phase,
        "error": predicted.total / measured - 1,
    }


def run_all(cases: list) -> list[dict]:
    rows = []
    for case in cases:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{case} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="four layouts only")
    ap.add_argument("--tiny", action="store_true", help="two of the tiny preset's layouts (the test suite's)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    rows = run_all(QUICK if args.quick else [c for c in CASES if c[0] == "tiny"][1:3] if args.tiny else CASES)
    print(f"{'preset':<10} {'layout':<34} {'measured GiB':>12} {'predicted':>9} {'error':>7}  phase")
    for r in rows:
        preset, shard, tp, ac, mb, accum, precision, tied = r["case"]
        what = f"shard {shard} tp {tp} AC {ac} mb {mb}x{accum} {precision}{'' if tied else ' untied'}"
        print(
            f"{preset:<10} {what:<34} {r['measured'] / 2**30:12.3f} {r['predicted'] / 2**30:9.3f} "
            f"{r['error']:+7.1%}  {r['phase']}"
        )
    errors = [abs(r["error"]) for r in rows]
    print(f"{len(rows)} layouts: median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
