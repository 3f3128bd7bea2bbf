"""The planner's time model against measured steps on this CPU (gloo, 1-4 processes under
torchrun): for each layout, the predicted step time (from `kiln plan profile`'s measurements)
and the measured one (the median over steps 5-16 of a real `kiln train`, each layout run three times, in
passes over the list in alternating orders, and the lowest median kept: on a shared machine a
neighbour only ever slows a run down); mean absolute percentage error, Kendall's tau between the
two orders, and whether the measured fastest is in the predicted top 3.

    python bench/plan_time.py [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

COMMON = [
    "train.precision=fp32",
    "model.tie_embeddings=false",
    "train.time_budget_s=0",
    "train.steps=16",
    "eval.every=0",
    "eval.batches=1",
    "eval.sample_tokens=1",
    "checkpoint.every=0",
    "log.every=1",
    "log.plot=false",
    "guard.hang_min_s=0",
]


def cases():
    from kiln.plan.layout import Layout

    return [
        Layout(1, 1, 1, 1, 16, 1),
        Layout(1, 1, 1, 1, 8, 2),
        Layout(1, 1, 1, 1, 4, 4),
        Layout(1, 1, 1, 1, 16, 1, "full"),
        Layout(1, 2, 1, 1, 8, 1),
        Layout(1, 2, 1, 1, 4, 2),
        Layout(1, 1, 2, 1, 16, 1),
        Layout(2, 1, 1, 1, 8, 1),
        Layout(1, 1, 1, 2, 4, 4, "none", "1f1b"),
        Layout(1, 1, 1, 2, 2, 8, "none", "gpipe"),
        Layout(1, 4, 1, 1, 4, 1),
        Layout(1, 2, 2, 1, 8, 1),
        Layout(1, 2, 1, 2, 4, 2, "none", "1f1b"),
        Layout(1, 1, 2, 2, 4, 4, "none", "1f1b"),
    ]


def measure(layout, runs: Path, name: str) -> float:
    sets = COMMON + layout.sets()
    cmd = [sys.executable, "-m", "kiln", "train", "--preset", "tiny", "--runs-dir", str(runs), "--name", name]
    if layout.world > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={layout.world}",
            "-m",
            "kiln",
            "train",
            "--preset",
            "tiny",
            "--runs-dir",
            str(runs),
            "--name",
            name,
        ]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, KILN_QUIET="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // layout.world)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{layout.describe()} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = records[0]["tokens"] / records[0]["step"]
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in records[4:])


def kendall(a: list[float], b: list[float]) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    agree = sum(1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 for i, j in pairs)
    return agree / len(pairs)


def main() -> None:
    from kiln.config import load_config
    from kiln.plan.peak_memory import model_facts
    from kiln.plan.profile import load_profile, run_profile
    from kiln.plan.timing import local_step_time

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument(
        "--passes", type=int, default=3, help="runs of every layout (alternating order); the fastest counts"
    )
    args = ap.parse_args()
    cfg = load_config("tiny", overrides=COMMON)
    cores = os.cpu_count() or 1
    run_profile(cfg, cfg.data.vocab_size, (1, 2, 4))
    facts = model_facts(cfg, cfg.data.vocab_size, "fp32")
    layouts = cases()
    passes: list[dict[int, float]] = [{} for _ in range(args.passes)]
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.passes):
            for i in range(len(layouts)) if k % 2 == 0 else reversed(range(len(layouts))):
                passes[k][i] = measure(layouts[i], Path(tmp), f"p{k}-l{i}")
                print(f"pass {k + 1}: {layouts[i].describe():<48} {passes[k][i] * 1e3:7.1f} ms", flush=True)
    rows = []
    for i, layout in enumerate(layouts):
        fit = load_profile(cfg, max(1, cores // layout.world))
        predicted = local_step_time(facts, layout, cfg.global_batch, *fit, cores).total
        runs = [p[i] for p in passes]
        measured = min(runs)
        rows.append(
            {
                "layout": layout.describe(),
                "world": layout.world,
                "predicted_s": predicted,
                "measured_s": measured,
                "passes_s": runs,
            }
        )
        print(
            f"{layout.world}  {layout.describe():<48} predicted {predicted * 1e3:7.1f} ms  measured "
            f"{measured * 1e3:7.1f} ms  ({predicted / measured - 1:+.0%}; passes "
            f"{', '.join(f'{t * 1e3:.0f}' for t in runs)})",
            flush=True,
        )
    p = [r["predicted_s"] for r in rows]
    m = [r["measured_s"] for r in rows]
    mape = statistics.fmean(abs(a / b - 1) for a, b in zip(p, m))
    tau = kendall(p, m)
    fastest = min(range(len(m)), key=m.__getitem__)
    top3 = sorted(range(len(p)), key=p.__getitem__)[:3]
    print(
        f"{len(rows)} layouts: MAPE {mape:.0%} (target 20%), Kendall tau {tau:.2f} (target 0.7), measured fastest "
        f"({rows[fastest]['layout']}) {'in' if fastest in top3 else 'NOT in'} the predicted top 3"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "mape": mape, "tau": tau, "fastest_in_top3": fastest in top3}, indent=1)
        )


if __name__ == "__main__":
    main()
