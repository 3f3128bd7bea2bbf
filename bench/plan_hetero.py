"""`kiln plan` on mixed clusters: work split by speed against the same work split evenly.

1. Simulated mixes (the datasheet time model): for each mixed cluster and preset, the planner's
   best plan (uneven batch shares or layer split) against the best plan that splits evenly.
2. This CPU: two gloo processes of one thread each, rank 1 throttled to half speed
   (faults.throttle_rank = 1, throttle_factor = 2: after each leaf module's forward and after
   its backward it sleeps as long as that pass took). The model is the tiny preset
   widened to 512 and 4 layers, so per-sequence compute dominates the step (at width 128 the
   fixed costs do and no split of the batch can matter). The planner's shares (from `kiln plan
   profile`'s fit, rank 1's costs doubled) against the even split, both measured.

    python bench/plan_hetero.py [--steps 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kiln.config import load_config
from kiln.plan.cluster import BUILTIN, Cluster, Group
from kiln.plan.hetero import hetero_plans, local_shares
from kiln.plan.peak_memory import model_facts
from kiln.plan.search import HEADROOM, search

MIXES = [
    ("h100", 8, "a100", 8),
    ("h100", 8, "l40s", 8),
    ("a100", 8, "a10g", 8),
    ("h200", 8, "h100-pcie", 8),
    ("b200", 8, "a100", 8),
    ("h100", 16, "l4", 16),
    ("mi300x", 8, "a100-40gb", 8),
    ("a100", 8, "l4", 8),
]
PRESETS = ("gpt2-124m", "llama-1b")


def simulated() -> list[dict]:
    rows = []
    for preset in PRESETS:
        cfg = load_config(preset=preset)
        f = model_facts(cfg, cfg.data.vocab_size, "bf16")
        for a, na, b, nb in MIXES:
            cluster = Cluster((Group(BUILTIN[a], 8, na // 8), Group(BUILTIN[b], 8, nb // 8)), name=f"{a}+{b}")
            plans = hetero_plans(f, cluster, cfg.global_batch, HEADROOM)
            if not plans:
                rows.append({"preset": preset, "cluster": cluster.describe(), "plan": None})
                continue
            best = plans[0]
            # the even split's best: these shapes evenly, or any layout Kiln runs with every device
            # counted as the slowest kind (an even split waits for it every step)
            slowest = min((g.kind for g in cluster.groups), key=lambda k: k.peak_tflops)
            same = Cluster(tuple(Group(slowest, g.per_node, g.nodes) for g in cluster.groups))
            found = search(cfg, cfg.data.vocab_size, same, "bf16", facts=f)
            uniform = max([p.uniform_tokens_per_s for p in plans] + [c.tokens_per_s for c in found.plans[:1]])
            if not uniform:  # the even split cannot run here (the batch does not divide)
                rows.append({"preset": preset, "cluster": cluster.describe(), "plan": best.describe(), "speedup": None})
                continue
            rows.append(
                {
                    "preset": preset,
                    "cluster": cluster.describe(),
                    "plan": best.describe(),
                    "tokens_per_s": best.tokens_per_s,
                    "uniform_tokens_per_s": uniform,
                    "speedup": best.tokens_per_s / uniform if uniform else None,
                }
            )
            print(
                f"{preset:10s} {cluster.describe():28s} {best.tokens_per_s:12,.0f} vs {uniform:12,.0f} tokens/s "
                f"({best.tokens_per_s / uniform:.2f}x)  {best.describe()}",
                flush=True,
            )
    return rows


CPU_MODEL = ["model.d_model=512", "model.n_heads=8", "model.n_layers=4", "train.threads=1", "train.precision=fp32"]


def train(name: str, shares: list[int] | None, steps: int, root: Path) -> float:
    sets = [
        *CPU_MODEL,
        f"train.steps={steps}",
        "train.time_budget_s=0",
        "eval.every=0",
        "eval.batches=1",
        "checkpoint.every=0",
        "log.plot=false",
        "eval.sample_tokens=1",
        "faults.throttle_rank=1",
        "faults.throttle_factor=2",
        "log.every=1",
    ]
    if shares:
        sets.append(f"parallel.dp_batch_shares=[{','.join(map(str, shares))}]")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "kiln",
        "train",
        "--preset",
        "tiny",
        "--runs-dir",
        str(root),
        "--name",
        name,
    ]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(
        cmd, env=dict(os.environ, KILN_QUIET="1", OMP_NUM_THREADS="1"), capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_s"] for r in records[2:])  # past the first steps (allocation, warm-up)
    return rates[len(rates) // 2]


def on_this_cpu(steps: int) -> dict:
    from kiln.plan.profile import load_profile, run_profile

    cfg = load_config(preset="tiny", overrides=CPU_MODEL)
    measured = load_profile(cfg, 1)
    if measured is None:  # what `kiln plan profile --cluster local:2` measures for this model
        run_profile(cfg, cfg.data.vocab_size, (os.cpu_count() or 1,))  # as many processes as cores: one thread each
        measured = load_profile(cfg, 1)
    fit = measured[0]
    per_seq = [fit.per_seq_s, 2 * fit.per_seq_s]  # rank 1 computes at half speed
    fixed = [fit.fixed_s, 2 * fit.fixed_s]
    shares = local_shares(per_seq, fixed, cfg.global_batch)
    with tempfile.TemporaryDirectory() as tmp:
        even = train("even", None, steps, Path(tmp))
        planned = train("planned", shares, steps, Path(tmp))
    result = {"shares": shares, "even_tokens_per_s": even, "planned_tokens_per_s": planned, "speedup": planned / even}
    print(
        f"this CPU, rank 1 at half speed: shares {shares}: {planned:,.0f} tokens/s vs even {even:,.0f} "
        f"({planned / even:.2f}x)",
        flush=True,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    rows = simulated()
    speedups = [r["speedup"] for r in rows if r.get("speedup")]
    geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    print(f"geometric mean over {len(speedups)} mixes: {geomean:.2f}x")
    out = {"simulated": rows, "geomean": geomean}
    if not args.skip_cpu:
        out["cpu"] = on_this_cpu(args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
