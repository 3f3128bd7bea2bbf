"""`kiln runs`, `kiln compare` and `kiln report`: what a folder of runs holds, runs side by side,
and one run's report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.cli.common import Verbs, plugin_args


def add_runs(verbs: Verbs) -> None:
    runs = verbs.add_parser(
        "runs",
        help="list the runs in a folder: status, steps, validation loss, lineage",
        description="A table of the runs under DIR (default: runs).",
    )
    runs.add_argument("dir", metavar="DIR", nargs="?", default="runs")
    runs.add_argument("--tree", action="store_true", help="draw the family tree of forks")
    runs.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    plugin_args(runs)


def cmd_runs(args: argparse.Namespace) -> int:
    import json

    from kiln.progress import table_console
    from kiln.runs.catalog import family_tree, list_runs, run_row, runs_table

    rows = [run_row(r) for r in list_runs(Path(args.dir))]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs in {args.dir}")
    elif args.tree:
        print(family_tree(rows))
    else:
        table_console().print(runs_table(rows, title=f"Kiln runs in {args.dir}"))
    return 0


def add_compare(verbs: Verbs) -> None:
    compare = verbs.add_parser(
        "compare",
        help="compare runs: config differences, headline figures, curves",
        description="Compare runs: the config keys that differ, headline figures side by "
        "side, and DIR/compare.png + DIR/compare.md.",
    )
    compare.add_argument("runs", metavar="RUN_DIR", nargs="+")
    compare.add_argument("--out", default=".", metavar="DIR", help="where compare.png and compare.md go (default: .)")
    compare.add_argument(
        "--metric",
        dest="metrics",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="plot these metrics (metrics.jsonl or eval.jsonl keys) instead of the losses; "
        "--metric loss lr, or repeated",
    )
    plugin_args(compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from kiln.progress import table_console
    from kiln.runs.compare import compare_runs, compare_tables

    result = compare_runs(
        [Path(r) for r in args.runs],
        Path(args.out),
        args.metrics or None,
        log=lambda text: print(text, file=sys.stderr),
    )
    for table in compare_tables(result):
        table_console().print(table)
    print(f"wrote {result['md']} and {result['png']}")
    return 0


def add_report(verbs: Verbs) -> None:
    report = verbs.add_parser("report", help="write a run's report (report.md and a self-contained report.html)")
    report.add_argument("run", metavar="RUN_DIR")
    report.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/report)")
    plugin_args(report)


def cmd_report(args: argparse.Namespace) -> int:
    from kiln.runs.report import write_report
    from kiln.runs.rundir import RunDir

    run = RunDir.open(Path(args.run))
    write_report(run.path, Path(args.out) if args.out else None)  # it says what it wrote
    return 0
