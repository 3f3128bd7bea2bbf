"""`kiln <verb>`: each verb is a thin call into the module that does the work.

Each verb's parser sits beside its command, one module per verb or pair of verbs: train (train,
fork), prepare, interop (export, import), evaluation (sample, eval), runs (runs, compare,
report), plan, scaling (sweep, scaling) and doctor; common holds what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from kiln.cli import doctor, evaluation, interop, plan, prepare, runs, scaling, train
from kiln.cli.common import OneLineParser, Verbs, config_from_args, launch_torchrun, presets_epilog
from kiln.errors import KilnError

Command = Callable[[argparse.Namespace], int]


def _doctor(args: argparse.Namespace) -> int:
    return doctor.cmd_doctor(args, main)  # --apply runs the remedy as a kiln command line


# verb -> (add its parser, run it), in the order `kiln --help` lists them
VERBS: dict[str, tuple[Callable[[Verbs], None], Command]] = {
    "train": (train.add_train, train.cmd_train),
    "prepare": (prepare.add_prepare, prepare.cmd_prepare),
    "export": (interop.add_export, interop.cmd_export),
    "plan": (plan.add_plan, plan.cmd_plan),
    "import": (interop.add_import, interop.cmd_import),
    "sample": (evaluation.add_sample, evaluation.cmd_sample),
    "eval": (evaluation.add_eval, evaluation.cmd_eval),
    "runs": (runs.add_runs, runs.cmd_runs),
    "compare": (runs.add_compare, runs.cmd_compare),
    "fork": (train.add_fork, train.cmd_fork),
    "report": (runs.add_report, runs.cmd_report),
    "sweep": (scaling.add_sweep, scaling.cmd_sweep),
    "scaling": (scaling.add_scaling, scaling.cmd_scaling),
    "doctor": (doctor.add_doctor, _doctor),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kiln",
        description="Pretrain language models, from raw text to an evaluated model.",
        epilog=presets_epilog(),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)
    for add, _ in VERBS.values():
        add(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage mistake (one line already written)
        return e.code if isinstance(e.code, int) else 2
    if not args.verb:
        parser.print_help()
        return 2
    if args.verb == "train" and args.nproc_per_node:
        return launch_torchrun(args.nproc_per_node, list(sys.argv[1:] if argv is None else argv))
    try:
        from kiln.plugins import load_plugins

        load_plugins(getattr(args, "plugin", []))
        code = VERBS[args.verb][1](args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return code
    except KilnError as e:
        # one write (shorter than a pipe's atomic size), so the lines of several ranks never interleave
        sys.stderr.write(f"kiln: error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kiln runs --json | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


__all__ = ["OneLineParser", "VERBS", "build_parser", "config_from_args", "launch_torchrun", "main"]
