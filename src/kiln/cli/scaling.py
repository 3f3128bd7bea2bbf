"""`kiln sweep` and `kiln scaling`: run a grid of model sizes x token budgets, fit scaling laws
to the results and predict from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.cli.common import Verbs
from kiln.errors import KilnError


def add_sweep(verbs: Verbs) -> None:
    sweep = verbs.add_parser(
        "sweep",
        help="run a grid or IsoFLOP set of model sizes x token budgets as runs",
        description="Run every point of SWEEP.toml as an ordinary run under RUNS_DIR/<name>/ "
        "(finished points are skipped, interrupted ones resumed).",
    )
    sweep.add_argument("file", metavar="SWEEP.toml")
    sweep.add_argument("--runs-dir", default="runs", help="folder holding run folders (default: runs)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N", help="points trained at once (default 1)")
    sweep.add_argument("--dry-run", action="store_true", help="print the points and their runs' settings only")


def cmd_sweep(args: argparse.Namespace) -> int:
    from kiln.scaling.sweep import load_sweep, run_sweep, table

    if args.parallel < 1:
        raise KilnError(f"--parallel must be >= 1, got {args.parallel}")
    if args.dry_run:
        name, points = load_sweep(Path(args.file))
        print(table(points))
        for p in points:
            print(f"{name}/{p.name}: " + " ".join(f"--set {s}" for s in p.overrides))
        return 0
    run_sweep(Path(args.file), Path(args.runs_dir), parallel=args.parallel)
    return 0


def add_scaling(verbs: Verbs) -> None:
    scaling = verbs.add_parser("scaling", help="fit scaling laws to runs or a CSV; predict losses and sizes")
    scaling_verbs = scaling.add_subparsers(dest="scaling_verb", metavar="fit|predict", required=True)
    sfit = scaling_verbs.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta (Huber, L-BFGS, bootstrap)")
    sfit.add_argument("runs", nargs="*", metavar="RUN_DIR", help="finished runs of several sizes and token budgets")
    sfit.add_argument("--points", metavar="FILE.csv", help="instead of runs: a CSV with columns params,tokens,loss")
    sfit.add_argument("--json", metavar="OUT", help="write the fit as JSON (for kiln scaling predict)")
    sfit.add_argument("--plot", metavar="OUT.png", help="draw points, fitted curves, IsoFLOP parabolas, frontier")
    sfit.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals (default 100)")
    sfit.add_argument(
        "--backtest",
        action="store_true",
        help="also fit without the largest-compute points and predict them (a check of extrapolation "
        "that the intervals cannot make)",
    )
    spred = scaling_verbs.add_parser("predict", help="the loss at (N, D), or the compute-optimal size for a budget")
    spred.add_argument("fit", metavar="FIT.json")
    spred.add_argument("--params", type=float, help="non-embedding parameters N (with --tokens)")
    spred.add_argument("--tokens", type=float, help="training tokens D (with --params)")
    spred.add_argument(
        "--flops", type=float, help="a compute budget C = 6 N D (non-embedding N): the recommended N, D and a shape"
    )


def cmd_scaling(args: argparse.Namespace) -> int:
    import json

    from kiln.scaling.law import Law, fit
    from kiln.scaling.report import describe, plot, recommend

    if args.scaling_verb == "fit":
        from kiln.scaling.points import points_from_csv, points_from_runs

        if bool(args.points) == bool(args.runs):
            raise KilnError("give either run folders or --points FILE.csv")
        points = points_from_csv(Path(args.points)) if args.points else points_from_runs([Path(r) for r in args.runs])

        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        law = fit(points, bootstrap=args.bootstrap, progress=progress)
        print(describe(law))
        result = law.to_json()
        if args.backtest:
            from kiln.errors import ConfigError
            from kiln.scaling.backtest import backtest, describe_backtest

            try:
                result["backtest"] = backtest(
                    points, bootstrap=args.bootstrap, progress=lambda line: progress(f"backtest: {line}")
                )
                print(describe_backtest(result["backtest"]))
            except ConfigError as e:  # the fit itself stands; say why it cannot be checked this way
                result["backtest"] = {"skipped": str(e)}
                print(e)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        if args.plot:
            print(f"wrote {plot(law, points, Path(args.plot))}")
        return 0
    path = Path(args.fit)
    if not path.is_file():
        raise KilnError(f"{path} does not exist; write one with kiln scaling fit ... --json {path}")
    try:
        law = Law.from_json(json.loads(path.read_text()))
    except ValueError as e:
        raise KilnError(f"{path} is not valid JSON ({e})") from None
    if args.flops is not None:
        if args.flops <= 0 or args.params is not None or args.tokens is not None:
            raise KilnError("--flops takes a positive budget, alone (or give --params and --tokens)")
        print(recommend(law, args.flops))
        return 0
    if args.params is None or args.tokens is None or args.params <= 0 or args.tokens <= 0:
        raise KilnError("give positive --params N and --tokens D, or --flops C")
    lo, hi = law.interval(args.params, args.tokens)
    print(
        f"N = {args.params:.4g}, D = {args.tokens:.4g}: predicted loss {law.loss(args.params, args.tokens):.4f} "
        f"[{lo:.4f}, {hi:.4f}] (95% bootstrap)"
    )
    return 0
