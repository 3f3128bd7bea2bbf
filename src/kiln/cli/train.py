"""`kiln train` and `kiln fork` (a new attempt from a run's checkpoint, trained at once like
`kiln train --resume`): the verbs that start training."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kiln.cli.common import (
    OneLineParser,
    Verbs,
    config_args,
    config_from_args,
    launch_torchrun,
    plugin_args,
    presets_epilog,
)
from kiln.errors import KilnError


def add_train(verbs: Verbs) -> None:
    train = verbs.add_parser(
        "train",
        help="train a model (prepares data first if needed)",
        description="Train a model. Data is prepared implicitly when its shards are missing.",
        epilog=presets_epilog(),
    )
    config_args(train)
    train.add_argument("--name", help="run name (default: <preset>-<date>-<time>)")
    train.add_argument("--runs-dir", default="runs", help="folder holding run folders (default: runs)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest valid checkpoint"
    )
    train.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        metavar="N",
        help="start N processes on this machine through torchrun (same as `torchrun "
        "--standalone --nproc_per_node N -m kiln train ...`)",
    )
    train.add_argument(
        "--list-callbacks",
        action="store_true",
        help="list the registered callbacks and their options ([callbacks] enabled = [...])",
    )
    plugin_args(train)


def default_run_name(args: argparse.Namespace) -> str:
    return args.name or f"{args.preset or Path(args.config or 'tiny').stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from kiln.progress import console, quiet
    from kiln.runs.summary_table import summary_table
    from kiln.train.session import find_restarted_run, resume_run, start_run

    if args.list_callbacks:
        from kiln.train.callbacks.registry import describe_callbacks

        print(describe_callbacks())
        return 0
    if args.resume:
        if args.preset or args.config:
            raise KilnError(
                "--resume takes its config from the run folder; drop --preset/--config (use --set for allowed changes)"
            )
        summary = resume_run(Path(args.resume), args.overrides)
    else:
        cfg = config_from_args(args)
        # torchrun restarted the job after a failure: continue the run its first attempt started
        restarted = find_restarted_run(Path(args.runs_dir))
        if restarted is not None and (not args.name or restarted.name == args.name):
            summary = resume_run(restarted, args.overrides)
        else:
            summary = start_run(cfg, Path(args.runs_dir), default_run_name(args))
    if not quiet():
        console.print(summary_table(summary, title=f"Kiln run {summary['run']}"))
    return 0


def add_fork(verbs: Verbs) -> None:
    fork = verbs.add_parser(
        "fork",
        help="start a new attempt from a run's checkpoint, with changes",
        description="A new run that starts from RUN's checkpoint at (or before) step N, with "
        "the changes given, trained at once (like kiln train) unless --no-train.",
    )
    fork.add_argument("run", metavar="RUN_DIR")
    fork.add_argument("--step", type=int, help="fork at the newest valid checkpoint at or before this step")
    fork.add_argument("--name", required=True, help="the new run's name")
    fork.add_argument("--runs-dir", help="folder of the new run (default: the parent's folder)")
    fork.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a change: anything --resume may change, model.dropout, model.qk_norm, model.post_norm, "
        "train.z_loss (with --from-scratch: anything); repeatable",
    )
    fork.add_argument(
        "--skip-batches",
        action="append",
        default=[],
        metavar="A:B",
        help="never train on data batches A..B (inclusive, as events.jsonl's data_index); repeatable",
    )
    fork.add_argument(
        "--from-scratch",
        action="store_true",
        help="a fresh attempt with the changes (no checkpoint), same data order, lineage recorded",
    )
    fork.add_argument("--no-train", action="store_true", help="only create the fork; kiln train --resume trains it")
    fork.add_argument("--nproc-per-node", type=int, default=0, metavar="N", help="train it on N processes (torchrun)")
    plugin_args(fork)


def cmd_fork(args: argparse.Namespace) -> int:
    from kiln.plugins import loaded_plugins
    from kiln.train.resolve import check_training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise KilnError(
            "kiln fork creates the run in one process; drop torchrun and pass --nproc-per-node N to "
            "train the fork on N processes"
        )
    from kiln.runs.fork import create_fork

    fork = create_fork(
        Path(args.run),
        args.name,
        args.step,
        args.overrides,
        args.skip_batches,
        args.from_scratch,
        Path(args.runs_dir) if args.runs_dir else None,
        check=check_training,
        plugins=loaded_plugins(),
    )
    if args.no_train:
        print(f"created {fork.run.path}; train it with: kiln train --resume {fork.run.path}")
        return 0
    resume = ["train", "--resume", str(fork.run.path), *(f"--plugin={p}" for p in args.plugin)]
    if args.nproc_per_node:
        return launch_torchrun(args.nproc_per_node, resume)
    return cmd_train(_train_args(resume))


def _train_args(argv: list[str]) -> argparse.Namespace:
    """`kiln ARGV` parsed for a train command line, as `kiln` itself parses it."""
    parser = OneLineParser(prog="kiln")
    add_train(parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser))
    return parser.parse_args(argv)
