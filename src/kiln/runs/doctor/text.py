"""The doctor's findings as people and scripts read them: numbered text (the numbers
`kiln doctor --apply K` takes), `--json`, and the argv of the remedy `--apply K` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runs.doctor.findings import SEVERITY_RANK


def findings_json(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `kiln doctor --json` prints: kind, severity, steps, evidence and the remedy's command
    (or null), in the printed order."""
    return [
        {
            "kind": f["kind"],
            "severity": f["severity"],
            "steps": f["steps"],
            "evidence": f["evidence"],
            "remedy": f["remedy"]["command"] if f.get("remedy") else None,
        }
        for f in findings
    ]


def _steps(f: dict[str, Any]) -> str:
    a, b = f["steps"]
    return f"step {a}" if a == b else f"steps {a}-{b}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    return str(v)


def format_findings(findings: list[dict[str, Any]], explain: bool = False, run: Path | str | None = None) -> str:
    """The findings as numbered text (the numbers `--apply K` takes); `explain` adds the evidence
    and why each remedy helps."""
    head = f"kiln doctor: {run}: " if run is not None else ""
    if not findings:
        return head + "no problems found"
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in SEVERITY_RANK}
    lines = [head + f"{len(findings)} finding(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    width = len(str(len(findings)))
    for i, f in enumerate(findings, 1):
        pad = " " * (width + 2)
        lines.append(f"{i:>{width}}. {f['severity'].upper():8} {f['kind']} ({_steps(f)}): {f['summary']}")
        if explain and f["evidence"]:
            lines.append(pad + "evidence: " + ", ".join(f"{k}={_value(v)}" for k, v in f["evidence"].items()))
        remedy = f.get("remedy")
        if remedy:
            lines.append(pad + "fix: " + remedy["command"])
            if explain and remedy.get("why"):
                lines.append(pad + "     " + remedy["why"])
    if any(f.get("remedy") and f["remedy"].get("kiln", True) for f in findings):
        lines.append("apply a fix with: kiln doctor RUN --apply K (K = the finding's number)")
    return "\n".join(lines)


def remedy_argv(findings: list[dict[str, Any]], k: int) -> list[str]:
    """The kiln argv of finding `k` (1-based, as printed) for `--apply K`."""
    if not findings:
        raise KilnError("--apply: kiln doctor found nothing to fix")
    if not 1 <= k <= len(findings):
        raise KilnError(f"--apply {k}: choose a finding between 1 and {len(findings)} (the numbers kiln doctor prints)")
    f = findings[k - 1]
    remedy = f.get("remedy")
    if not remedy:
        raise KilnError(f"--apply {k}: finding {k} ({f['kind']}) has no remedy to apply")
    if remedy.get("kiln") is False:
        raise KilnError(
            f"--apply {k}: the remedy of finding {k} ({f['kind']}) is not a kiln command; run it "
            f"yourself: {remedy['command']}"
        )
    return list(remedy["argv"])
