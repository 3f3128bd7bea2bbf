"""`kiln plan`: parallel layouts for a cluster, with predicted tokens/s and memory (and
`kiln plan profile`, which measures this machine for --cluster local:N)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.cli.common import Verbs, config_args, config_from_args
from kiln.errors import KilnError


def add_plan(verbs: Verbs) -> None:
    plan = verbs.add_parser(
        "plan",
        help="propose parallel layouts for a cluster: predicted tokens/s and memory",
        description="Search dp_replicate x dp_shard x tp x pp, micro-batching, activation "
        "checkpointing and pipeline schedules for a model on a cluster; print "
        "the best plans and the --set lines that run them.",
        epilog="--cluster: a cluster TOML (see kiln.plan.cluster), DEVICE:N (e.g. h100:16; "
        "devices: h100 h100-pcie h200 b200 a100 a100-40gb l40s l4 a10g mi300x) or local:N",
    )
    plan.add_argument(
        "action",
        nargs="?",
        choices=["profile"],
        help="profile: measure this machine for --cluster local:N (compute per micro-batch, gloo "
        "collectives) and cache it; then plan without it",
    )
    config_args(plan)
    plan.add_argument("--cluster", required=True, help="cluster file, DEVICE:N or local:N")
    plan.add_argument("--top", type=int, default=5, help="plans to print (default 5)")
    plan.add_argument("--explain", action="store_true", help="why the best wins; why the other families lost")
    plan.add_argument("--json", metavar="OUT", help='write {"plans": [...]} here, best first')


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from kiln.plan.cluster import load_cluster
    from kiln.plan.search import GiB, explain, search

    cfg = config_from_args(args)
    cluster = load_cluster(args.cluster)
    if args.action == "profile":
        from kiln.plan.profile import run_profile

        if not cluster.local:
            raise KilnError("kiln plan profile measures this machine: use --cluster local:N")
        path = run_profile(cfg, cfg.data.vocab_size, (cluster.world_size,))
        print(f"wrote {path}")
        return 0
    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"
    if cluster.mixed:
        return _plan_mixed(cfg, cluster, precision, args)
    result = search(cfg, cfg.data.vocab_size, cluster, precision)
    print(
        f"{cluster.describe()}: {result.examined:,} layouts examined in {result.seconds:.1f} s, "
        f"{len(result.plans):,} fit"
    )
    for i, c in enumerate(result.plans[: args.top], 1):
        print(f"{i}. {c.tokens_per_s:12,.0f} tokens/s  {c.memory.total / GiB:6.1f} GiB  {c.layout.describe()}")
        print("   " + " ".join(f"--set {s}" for s in c.layout.sets()))
    if args.explain:
        print("\n".join(explain(result)))
    if args.json:
        plans = [
            {
                "set": c.layout.sets(),
                "tokens_per_s": c.tokens_per_s,
                "memory_gb": c.memory.total / 1e9,
                "why": f"step: {c.time.dominant()} dominates",
            }
            for c in result.plans[: args.top]
        ]
        Path(args.json).write_text(
            json.dumps({"plans": plans, "examined": result.examined, "rejected": result.rejected}, indent=1)
        )
    if not result.plans:
        raise KilnError("no layout fits this cluster; see above (--explain says why each family was rejected)")
    return 0


def _plan_mixed(cfg, cluster, precision: str, args: argparse.Namespace) -> int:
    import json
    import time

    from kiln.plan.hetero import explain_mixed, plan_mixed

    t0 = time.perf_counter()
    plans = plan_mixed(cfg, cluster, precision)
    print(f"{cluster.describe()}: {len(plans)} plans split by device speed, in {time.perf_counter() - t0:.1f} s")
    for i, p in enumerate(plans[: args.top], 1):
        memory = max(m.total for m in p.memory) / 2**30
        print(f"{i}. {p.tokens_per_s:12,.0f} tokens/s ({p.speedup:.2f}x uniform)  {memory:6.1f} GiB  {p.describe()}")
        print("   " + " ".join(f"--set {s}" for s in p.sets()))
    if args.explain:
        print("\n".join(explain_mixed(plans, cluster)))
    if args.json:
        rows = [
            {
                "set": p.sets(),
                "tokens_per_s": p.tokens_per_s,
                "memory_gb": max(m.total for m in p.memory) / 1e9,
                "uniform_tokens_per_s": p.uniform_tokens_per_s,
                "why": f"{p.shape} parallel split by speed: {p.speedup:.2f}x the uniform split",
            }
            for p in plans[: args.top]
        ]
        Path(args.json).write_text(json.dumps({"plans": rows}, indent=1))
    if not plans:
        raise KilnError("no plan fits this mixed cluster (a share or stage exceeds a device's memory)")
    return 0
