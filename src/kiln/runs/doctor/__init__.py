"""`kiln doctor RUN [--json] [--explain] [--apply K]`: what went wrong in a run, and the command
that would fix it.

`diagnose(run)` reads the run folder only (through RunDir: metrics, events, layer statistics,
evaluations, status, the watchdog's hang dumps, the checkpoints — verified — the config and the
prepared dataset's manifest) and returns findings ranked by severity (critical, warning, info),
then by step:

    {"kind": "divergence", "severity": "critical", "steps": [first, last],
     "evidence": {...numbers, layer names, ranks...}, "summary": "one line a person reads",
     "remedy": {"command": "kiln fork RUN --step N --name RUN-divergence --set optim.lr=...",
                "argv": ["fork", RUN, ...], "why": "..."} or None}

Remedies are `kiln fork` commands from the newest checkpoint that verifies at or before the
trouble (a fresh attempt, `--from-scratch`, when there is none), `kiln train --resume RUN` for
infrastructure faults, and for a swapped tokenizer a shell `cp` (marked "kiln": False).

The rules, one module per topic (`RULES` below lists them in the order they run):

    divergence      the loss runs away: divergence, non-finite values, gradient-norm growth
    spikes          loss and gradient-norm spikes
    progress        not learning: a plateau (LR too low), an end at the context-free baseline
    layers          layer statistics: activation and attention-logit blow-ups, collapse, dead units
    moe             a collapsed mixture-of-experts router
    evaluation      overfitting, regressions between evaluations
    performance     slow steps, loader stalls, a slow rank
    infrastructure  hangs, corrupt checkpoints, failed or interrupted runs, invariants
    data            a tokenizer that is not the prepared data's

with `context` (the run as the rules read it, and the remedies), `findings` (the finding record
and number helpers), `series` (robust statistics on long arrays) and `text` (the printed forms).
Nothing here imports the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.runs.doctor import data, divergence, evaluation, infrastructure, layers, moe, performance, progress, spikes
from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import SEVERITY_RANK, finding

# the names the old flat module kiln.runs.doctor had (tests/integration/run_tools_reference.py,
# a frozen copy of the rules, imports them from here)
from kiln.runs.doctor.infrastructure import _stuck_frame
from kiln.runs.doctor.performance import (
    RANK_KEY,
    SLOW_FACTOR,
    SLOW_MIN_S,
    SLOW_RANK_RATIO,
    SLOW_RANK_SHARE,
    SLOW_SHARE,
    SLOW_Z,
    WARMUP_INTERVALS,
)
from kiln.runs.doctor.text import findings_json, format_findings, remedy_argv
from kiln.runs.rundir import RunDir

Rule = Callable[[Context], list[dict[str, Any]]]

# The built-in rules in the order they run: findings that tie in rank (severity, first step, kind)
# print in this order, and a rule may reuse an analysis an earlier one cached (ctx.cache).
RULES: list[Rule] = [
    divergence.divergence,
    divergence.nonfinite,
    spikes.spikes,
    progress.plateau,
    divergence.grad_growth,
    layers.layer_blowups,
    layers.collapsed_layers,
    moe.router_collapse,
    progress.no_learning,
    evaluation.overfitting,
    evaluation.eval_regression,
    performance.slow_steps,
    performance.slow_rank,
    infrastructure.hang,
    infrastructure.corrupt_checkpoint,
    data.tokenizer_mismatch,
    infrastructure.run_state,
]


def rule(fn: Rule) -> Rule:
    """Register a rule of your own (a plugin's): it runs after the built-in ones."""
    RULES.append(fn)
    return fn


def diagnose(run_path: Path) -> list[dict[str, Any]]:
    """Every finding of every rule for the run at `run_path`, most severe first, then by step."""
    ctx = Context(RunDir.open(Path(run_path)))
    findings: list[dict[str, Any]] = []
    for check in RULES:
        findings += check(ctx)
    return rank(findings)


def rank(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(findings, key=lambda f: (SEVERITY_RANK.get(f["severity"], 3), f["steps"][0], f["kind"]))


__all__ = [
    "RANK_KEY",
    "RULES",
    "SEVERITY_RANK",
    "SLOW_FACTOR",
    "SLOW_MIN_S",
    "SLOW_RANK_RATIO",
    "SLOW_RANK_SHARE",
    "SLOW_SHARE",
    "SLOW_Z",
    "WARMUP_INTERVALS",
    "Context",
    "Rule",
    "_stuck_frame",
    "diagnose",
    "finding",
    "findings_json",
    "format_findings",
    "rank",
    "remedy_argv",
    "rule",
]
