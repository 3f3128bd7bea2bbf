"""`kiln sample` and `kiln eval`: generate text from a run's checkpoint, and run evaluation
suites on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.cli.common import STEP_HELP, Verbs, plugin_args, stderr
from kiln.errors import KilnError


def add_sample(verbs: Verbs) -> None:
    sample = verbs.add_parser("sample", help="generate text from a run's checkpoint")
    sample.add_argument("run", metavar="RUN_DIR")
    sample.add_argument("--prompt", action="append", default=[], help="prompt text; repeatable")
    sample.add_argument("--max-tokens", type=int, default=100)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=50)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--step", type=int, help=STEP_HELP)
    plugin_args(sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from kiln.eval.sample import sample_from_run

    for text in sample_from_run(
        Path(args.run),
        args.prompt or ["\n"],
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.step,
        say=stderr,  # the samples alone on stdout
    ):
        print(text)
        print("-" * 40)
    return 0


def add_eval(verbs: Verbs) -> None:
    ev = verbs.add_parser(
        "eval",
        help="run evaluation suites on a run's checkpoint",
        description="Run evaluation suites on a checkpoint; writes RUN_DIR/eval/step-N.json.",
        epilog="built-in suites: lm, continuation, choice, bias, toxicity, memorisation; "
        "`kiln eval --list` shows every registered suite and its options",
    )
    ev.add_argument("run", metavar="RUN_DIR", nargs="?")
    ev.add_argument(
        "--step",
        type=int,
        help=STEP_HELP,
    )
    ev.add_argument(
        "--suite",
        dest="suites",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="suites to run (default: all registered)",
    )
    ev.add_argument(
        "--suite-file",
        dest="plugin",
        action="append",
        default=[],
        metavar="PATH",
        help="the same as --plugin (a .py file registering suites with @register_suite)",
    )
    ev.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="SUITE.KEY=VALUE",
        help="a suite option, e.g. -o choice.tasks=hellaswag.jsonl -o bias.pairs=crows_pairs.csv",
    )
    ev.add_argument("--list", action="store_true", help="list the registered suites and their options")
    ev.add_argument(
        "--weights",
        metavar="FILE",
        help="a quantised export of this run (kiln export --quantize): "
        "evaluate it, and report its perplexity change against the checkpoint it came from",
    )
    ev.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py|MODULE",
        help="import user code that registers suites (and other components); repeatable",
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from kiln.eval.runner import evaluate_run, report_table
    from kiln.eval.suites import describe_suites
    from kiln.progress import console, quiet

    if args.list:
        print(describe_suites())
        return 0
    if not args.run:
        raise KilnError("kiln eval needs a run folder: kiln eval RUN_DIR [--suite NAME ...]")
    report, path = evaluate_run(
        Path(args.run),
        args.step,
        args.suites,
        args.option,
        log=None if quiet() else console.print,
        weights=Path(args.weights) if args.weights else None,
    )
    console.print(report_table(report, title=f"Kiln eval {args.run} @ step {report['step']}"))
    print(f"wrote {path}")
    return 0
