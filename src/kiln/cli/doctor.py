"""`kiln doctor`: diagnose a run, and apply a finding's remedy (--apply K)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from kiln.cli.common import Verbs, plugin_args
from kiln.errors import KilnError


def add_doctor(verbs: Verbs) -> None:
    doctor = verbs.add_parser(
        "doctor",
        help="diagnose a run: findings by severity, each with evidence and a remedy",
        description="Read a run's records and list what went wrong (critical, warning, "
        "info), each with its evidence and a remedy Kiln can run.",
    )
    doctor.add_argument("run", metavar="RUN_DIR")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument(
        "--explain",
        action="store_true",
        help="also ask the LLM at KILN_LLM_URL (KILN_LLM_MODEL, KILN_LLM_KEY) to explain the "
        "findings; a scrubbed digest is sent, the rules still decide",
    )
    doctor.add_argument("--apply", type=int, metavar="K", help="run the remedy of finding K (as numbered)")
    doctor.add_argument(
        "--fail-on",
        choices=("critical", "warning"),
        help="exit 1 when a finding is at least this severe (for scripts and CI; default: exit 0)",
    )
    plugin_args(doctor)


def cmd_doctor(args: argparse.Namespace, kiln: Callable[[list[str]], int]) -> int:
    """`kiln doctor`; --apply K runs the remedy through `kiln` (kiln.cli.main, passed in because
    the package that holds it imports this module) as if it had been typed."""
    import json

    from kiln.runs.doctor import diagnose, findings_json, format_findings, remedy_argv
    from kiln.runs.rundir import RunDir

    run = RunDir.open(Path(args.run))
    findings = diagnose(run.path)
    if args.apply is not None:
        if args.fail_on:
            raise KilnError("--apply runs a remedy and exits with its code; --fail-on judges the findings: give one")
        argv = remedy_argv(findings, args.apply)
        print("running: kiln " + " ".join(argv), flush=True)
        return kiln([*argv, *(f"--plugin={p}" for p in args.plugin)])
    if args.json:
        print(json.dumps(findings_json(findings), indent=2))
    else:
        print(format_findings(findings))
    if args.explain:
        from kiln.runs.explain import explain, format_explanation

        text = explain(
            findings,
            config=run.config_dict(),
            summary=run.summary(),
            run=run.path,
            log=lambda line: print(line, file=sys.stderr),
        )
        if text:
            print(format_explanation(text))
    if args.fail_on:
        from kiln.runs.doctor import SEVERITY_RANK

        worst = min((SEVERITY_RANK.get(f["severity"], len(SEVERITY_RANK)) for f in findings), default=None)
        if worst is not None and worst <= SEVERITY_RANK[args.fail_on]:
            return 1
    return 0
