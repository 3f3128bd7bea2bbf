"""`kiln runs`: one line per run under a folder — status, progress, validation loss, lineage,
time — as a table, a family tree of forks, or JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runs.rundir import RunDir


def _created(run: RunDir) -> float | None:
    try:
        return time.mktime(time.strptime(run.meta().get("created", ""), "%Y-%m-%dT%H:%M:%S%z"))
    except ValueError:
        return None


def run_row(run: RunDir) -> dict[str, Any]:
    """What `kiln runs` shows of one run (every value JSON-serialisable). It reads the run's
    small files and only the end of metrics.jsonl: a folder of long runs lists in a blink."""
    status, summary = run.status(), run.summary() or {}
    last_metrics, evals = run.last_metrics(), run.evals()
    steps = max(last_metrics.get("step", 0), summary.get("steps", 0), status.get("step") or 0)
    losses = [e["val_loss"] for e in evals if isinstance(e.get("val_loss"), (int, float))]
    last_eval = evals[-1] if evals else {}
    lineage = run.lineage() or {}
    parent = lineage.get("parent") or {}
    started = _created(run) or status.get("started")
    if status.get("active_s") is not None:  # every training process of the run, this one up to now
        duration = status["active_s"] + (time.time() - status["heartbeat"] if status.get("state") == "running" else 0)
    else:
        duration = summary.get("seconds")
    return {
        "name": run.name,
        "path": str(run.path),
        "status": status.get("state"),
        "reason": status.get("reason"),
        "steps": steps,
        "tokens": last_metrics.get("tokens", summary.get("tokens")),
        "best_val_loss": min(losses) if losses else None,
        "last_val_loss": losses[-1] if losses else None,
        "last_eval_step": last_eval.get("step"),
        "headline": headline(last_eval),
        "parent": parent.get("run"),
        "fork_step": None if lineage.get("from_scratch") else parent.get("step"),
        "from_scratch": bool(lineage.get("from_scratch")),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else None,
        "duration_s": round(duration, 1) if duration is not None else None,
    }


def headline(record: dict[str, Any]) -> str:
    """The figures of an evaluation worth a glance: perplexity, accuracy, bits per byte."""
    parts = []
    for key, label, spec in (
        ("val_ppl", "ppl", ".1f"),
        ("val_acc", "acc", ".3f"),
        ("val_masked_acc", "masked acc", ".3f"),
        ("lm/bits_per_byte", "bpb", ".3f"),
    ):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{label} {format(record[key], spec)}")
    return " ".join(parts)


def list_runs(folder: Path) -> list[RunDir]:
    folder = Path(folder)
    if not folder.is_dir():
        raise KilnError(f"'{folder}' is not a folder of runs; pass the --runs-dir you trained with (default: runs)")
    return [RunDir(p) for p in sorted(folder.iterdir()) if (p / "config.toml").is_file()]


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _cell(value: Any, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def runs_table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in (
        "run",
        "status",
        "steps",
        "tokens",
        "best val",
        "last val",
        "last eval",
        "parent@step",
        "started",
        "duration",
    ):
        table.add_column(
            col,
            justify="right" if col in ("steps", "tokens", "best val", "last val") else "left",
            no_wrap=col != "last eval",
        )
    for r in rows:
        parent = (
            "—"
            if not r["parent"]
            else (f"{r['parent']} (scratch)" if r["from_scratch"] else f"{r['parent']}@{r['fork_step']}")
        )
        last_eval = f"@{r['last_eval_step']}: {r['headline']}" if r["last_eval_step"] is not None else "—"
        table.add_row(
            r["name"],
            r["status"] or "—",
            _cell(r["steps"], ","),
            _cell(r["tokens"], ","),
            _cell(r["best_val_loss"], ".4f"),
            _cell(r["last_val_loss"], ".4f"),
            last_eval,
            parent,
            r["started"] or "—",
            fmt_duration(r["duration_s"]),
        )
    return table


def family_tree(rows: list[dict[str, Any]]) -> str:
    """Forks drawn under their parents (a parent outside the folder is shown by name)."""
    names = {r["name"] for r in rows}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for r in rows:
        children.setdefault(r["parent"] if r["parent"] in names else None, []).append(r)
    lines: list[str] = []

    def label(r: dict[str, Any]) -> str:
        at = "" if not r["parent"] else (" (from scratch)" if r["from_scratch"] else f" (from step {r['fork_step']})")
        outside = f" <- {r['parent']}" if r["parent"] and r["parent"] not in names else ""
        val = f", val {r['last_val_loss']:.4f}" if r["last_val_loss"] is not None else ""
        return f"{r['name']}{at}{outside}  [{r['status']}, {r['steps']:,} steps{val}]"

    def walk(r: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        lines.append((prefix + ("└─ " if last else "├─ ") if not top else "") + label(r))
        kids = children.get(r["name"], [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if top else ("   " if last else "│  ")), i == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return "\n".join(lines)
