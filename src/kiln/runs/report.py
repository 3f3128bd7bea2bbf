"""`kiln report`: one run as a document — status, lineage, curves (with the ancestors' curves
up to each fork point and the guard's events marked), evaluations over steps, the summary and
the resolved configuration -> report.md (figures beside it) and a self-contained report.html
(figures embedded, inline CSS, nothing fetched: it opens offline and can be mailed).

Sections are built once as blocks and rendered twice, so the two files say the same thing."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.fileio import write_atomic
from kiln.runfolder.downsample import minmax
from kiln.runs.curves import lineage_curves, lineage_events, number, pyplot, save_figure, step_to_x
from kiln.runs.rundir import RunDir

FIGSIZE, DPI = (7.0, 3.5), 100  # every figure of the report is 700 x 350 pixels
DASH = "—"
EVENT_COLORS = {
    "nonfinite": "red",
    "loss_spike": "orange",
    "grad_spike": "purple",
    "rollback": "black",
    "time_budget": "grey",
    "checkpoint_failed": "brown",
}
EVAL_FIRST = ("val_loss", "val_ppl", "val_acc", "val_masked_acc", "majority_baseline")


@dataclass
class Block:
    kind: str  # "h2", "p", "table", "img", "pre", "list"
    text: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    image: Path | None = None


def fmt(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:,.1f}" if abs(value) >= 1e4 else f"{value:.5g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


# --------------------------------------------------------------------------- figures


BOOKKEEPING = {"checkpoint"}  # events.jsonl records of routine work (each committed save's cost), not incidents


def _event_xs(run: RunDir, axis: str) -> list[tuple[float, dict[str, Any], bool]]:
    """(x, event, inherited) of the lineage's events: a parent's events before the fork point
    belong to this run's history too. Bookkeeping records (checkpoint costs) are not marked."""
    events = [
        (e, inherited)
        for _, e, inherited in lineage_events(run)
        if isinstance(e.get("step"), int) and e.get("kind") not in BOOKKEEPING
    ]
    xs = step_to_x(run, [e["step"] for e, _ in events], axis)
    return [(x, e, inherited) for x, (e, inherited) in zip(xs, events)]


def _figure(
    run: RunDir,
    path: Path,
    title: str,
    ylabel: str,
    curves: list[tuple[str, str, str]],
    events: bool = False,
    logy: bool = False,
    hline: tuple[float, str] | None = None,
) -> bool:
    """One figure of `curves` [(source, key, label)] along the lineage; False (no file) without data."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted, axes_seen = False, set()
    for i, (source, key, label) in enumerate(curves):
        previous = None
        for seg in lineage_curves(run, source, key):  # type: ignore[arg-type]
            if not len(seg.xs):
                continue
            axes_seen.add(seg.x)
            xs, ys = minmax(seg.xs, seg.ys, int(FIGSIZE[0] * DPI))  # a long run: spikes kept, pixels not wasted
            if previous is not None:  # joined at the fork point
                xs, ys = np.concatenate([previous.xs[-1:], xs]), np.concatenate([previous.ys[-1:], ys])
            style = dict(lw=0.9, ls="--", alpha=0.7) if seg.inherited else dict(lw=1.3)
            ax.plot(
                xs,
                ys,
                color=colors[i % len(colors)],
                marker="o" if source == "evals" else None,
                ms=3,
                label=f"{label} ({seg.run}, inherited)" if seg.inherited else label,
                **style,
            )
            plotted, previous = True, seg
    if not plotted:
        plt.close(fig)
        return False
    axis = "step" if "step" in axes_seen else "tokens"
    if events:
        labelled = set()
        for x, e, inherited in _event_xs(run, axis):
            kind = str(e.get("kind", "event"))
            ax.axvline(
                x,
                color=EVENT_COLORS.get(kind, "grey"),
                ls=":",
                lw=1,
                alpha=0.6 if inherited else 1.0,
                label=None if kind in labelled else f"event: {kind}",
            )
            labelled.add(kind)
    if hline is not None:
        ax.axhline(hline[0], ls="--", color="grey", lw=1, label=hline[1])
    if logy:
        ax.set_yscale("log")
    ax.set_title(f"{run.name}: {title}")
    ax.set_xlabel(axis)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, DPI)
    plt.close(fig)
    return True


def make_figures(run: RunDir, out_dir: Path) -> list[tuple[str, Path]]:
    """(caption, path) of every figure the run has data for, written into out_dir."""
    specs = [
        (
            "loss",
            "loss",
            "loss (nats/token)",
            [("metrics", "loss", "train"), ("evals", "val_loss", "validation")],
            True,
            False,
        ),
        ("lr", "learning rate", "lr", [("metrics", "lr", "lr")], False, False),
        (
            "grad_norm",
            "gradient norm",
            "grad norm (before clipping)",
            [("metrics", "grad_norm", "grad norm")],
            True,
            True,
        ),
        ("throughput", "throughput", "tokens/s", [("metrics", "tokens_per_s", "tokens/s")], False, False),
    ]
    entropy = number((run.summary() or {}).get("unigram_entropy"))
    out = []
    for name, title, ylabel, curves, events, logy in specs:
        path = out_dir / f"{name}.png"
        hline = (entropy, "unigram entropy (val)") if name == "loss" and entropy is not None else None
        if _figure(run, path, title, ylabel, curves, events, logy, hline):
            out.append((title, path))
    heat = run.path / "layer_stats.png"
    if heat.is_file():
        copy = out_dir / "layer_stats.png"
        write_atomic(copy, heat.read_bytes())
        out.append(("layer statistics", copy))
    return out


# --------------------------------------------------------------------------- sections


def _status_text(run: RunDir) -> str:
    status = run.status()
    text = status.get("state") or "unknown"
    if status.get("step") is not None:
        text += f" at step {status['step']:,}"
    if status.get("reason"):
        text += f" ({status['reason']})"
    if status.get("error"):
        text += f": {status['error']}"
    return text


def lineage_section(run: RunDir) -> list[Block]:
    """One row per generation that was forked, newest first: this run, its parent, ..."""
    rows = []
    chain = [run] + [a for a, _ in reversed(run.ancestry())]
    for gen in chain:
        lineage = gen.lineage()
        if not lineage:
            continue
        parent = lineage.get("parent") or {}
        at = "from scratch" if lineage.get("from_scratch") else fmt(parent.get("step"))
        sha = parent.get("checkpoint_sha256") or ""
        rows.append(
            [
                gen.name,
                fmt(parent.get("run")),
                at,
                fmt(parent.get("checkpoint")),
                sha[:12] or DASH,
                ", ".join(lineage.get("changes") or []) or DASH,
                ", ".join(f"{a}..{b}" for a, b in lineage.get("skip_batches") or []) or DASH,
                ", ".join(lineage.get("new_tensors") or []) or DASH,
                fmt(lineage.get("created")),
            ]
        )
    blocks = [Block("h2", "Lineage")]
    if not rows:
        return blocks + [Block("p", "none: the run was started afresh")]
    blocks.append(
        Block(
            "table",
            columns=[
                "run",
                "parent",
                "forked at step",
                "checkpoint",
                "sha256",
                "changes",
                "skipped batches",
                "new tensors",
                "created",
            ],
            rows=rows,
        )
    )
    parent = (run.lineage() or {}).get("parent") or {}
    if run.parent() is None:
        blocks.append(
            Block(
                "p",
                f"the parent run '{parent.get('run')}' was not found (next to this run, nor "
                f"at {parent.get('path')}): its curves are left out",
            )
        )
    return blocks


def _eval_columns(records: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    first = [k for k in EVAL_FIRST if k in keys]
    return ["step", "tokens", *first, *(k for k in keys if "/" in k)]


def _suite_reports(run: RunDir) -> list[dict[str, Any]]:
    reports = []
    if run.eval_dir.is_dir():
        for p in run.eval_dir.glob("step-*.json"):
            m = re.fullmatch(r"step-(\d+)\.json", p.name)
            if not m:
                continue
            try:
                report = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            report.setdefault("step", int(m.group(1)))
            reports.append(report)
    return sorted(reports, key=lambda r: r.get("step", 0))


def evaluation_section(run: RunDir) -> list[Block]:
    blocks = [Block("h2", "Evaluations")]
    evals = run.evals()
    if evals:
        cols = _eval_columns(evals)
        blocks += [
            Block("p", "eval.jsonl (every evaluation during training):"),
            Block("table", columns=cols, rows=[[fmt(r.get(c)) for c in cols] for r in evals]),
        ]
    else:
        blocks.append(Block("p", "no evaluations recorded"))
    reports = _suite_reports(run)
    suites: list[str] = []
    for rep in reports:
        suites.extend(s for s in (rep.get("suites") or {}) if s not in suites)
    for suite in suites:
        metrics: list[str] = []
        rows_from = [r for r in reports if suite in (r.get("suites") or {})]
        for rep in rows_from:
            metrics.extend(k for k in rep["suites"][suite] if k not in metrics)
        rows = [
            [
                fmt(rep.get("step")),
                *(fmt(rep["suites"][suite].get(k)) for k in metrics),
                fmt((rep.get("seconds") or {}).get(suite)),
            ]
            for rep in rows_from
        ]
        blocks += [Block("h3", f"suite: {suite}"), Block("table", columns=["step", *metrics, "seconds"], rows=rows)]
    skipped = [
        f"step {rep.get('step')}: {name}: {why}" for rep in reports for name, why in (rep.get("skipped") or {}).items()
    ]
    if skipped:
        blocks += [Block("p", "skipped suites:"), Block("list", items=skipped)]
    artifacts = [
        f"step {rep.get('step')}: {name}: eval/{where}"
        for rep in reports
        for name, where in (rep.get("artifacts") or {}).items()
    ]
    if artifacts:
        blocks += [Block("p", "artifacts (in the run folder):"), Block("list", items=artifacts)]
    return blocks


def events_section(run: RunDir) -> list[Block]:
    blocks = [Block("h2", "Guard and run events")]
    events = [(owner, e, inherited) for owner, e, inherited in lineage_events(run) if e.get("kind") not in BOOKKEEPING]
    if not events:
        return blocks + [Block("p", "none")]
    rows = []
    for owner, e, inherited in events:
        rest = {k: v for k, v in e.items() if k not in ("step", "kind", "action", "loss", "grad_norm")}
        rows.append(
            [
                owner + (" (inherited)" if inherited else ""),
                fmt(e.get("step")),
                fmt(e.get("kind")),
                fmt(e.get("action")),
                fmt(e.get("loss")),
                fmt(e.get("grad_norm")),
                fmt(rest) if rest else "",
            ]
        )
    columns = ["run", "step", "kind", "action", "loss", "grad norm", "details"]
    return blocks + [Block("table", columns=columns, rows=rows)]


def mixture_section(run: RunDir) -> list[Block]:
    """A mixture's sources (weights, limits, what was drawn from each, each one's last validation
    loss) and its stages; nothing for a single corpus."""
    data = run.config_dict().get("data") or {}
    sources, stages = data.get("sources") or [], data.get("stages") or []
    if not sources:
        return []
    last, summary = run.last_metrics(), run.summary() or {}
    weights = sum(float(s.get("weight", 0)) for s in sources) or 1.0
    drawn = {s["name"]: last.get(f"tokens/{s['name']}") for s in sources}
    counted = {k: float(v) for k, v in drawn.items() if isinstance(v, (int, float))}
    total = sum(counted.values())
    rows = [
        [
            fmt(s.get("name")),
            fmt(s.get("corpus")),
            f"{float(s.get('weight', 0)) / weights:.1%}",
            fmt(s.get("max_epochs") or "no limit"),
            fmt(drawn[s["name"]]),
            f"{counted[s['name']] / total:.1%}" if total and s["name"] in counted else DASH,
            fmt(summary.get(f"val_loss/{s['name']}")),
        ]
        for s in sources
    ]
    columns = ["source", "corpus", "weight", "max epochs", "tokens drawn", "share drawn", "final val loss"]
    blocks = [Block("h2", "Data mixture"), Block("table", columns=columns, rows=rows)]
    if stages:
        stage_rows = [
            [
                fmt(st.get("start")) if st.get("start", -1) >= 0 else f"{st.get('start_fraction', 0):.0%} of the steps",
                ", ".join(f"{k} {v:g}" for k, v in (st.get("weights") or {}).items()),
            ]
            for st in stages
        ]
        blocks += [Block("p", "Stages (the weights from each start on):")]
        blocks += [Block("table", columns=["from step", "weights"], rows=stage_rows)]
    return blocks


def summary_section(run: RunDir) -> list[Block]:
    blocks = [Block("h2", "Summary")]
    summary = run.summary()
    if not summary:
        return blocks + [Block("p", f"none: the run has no summary.json (it is {_status_text(run)})")]
    rows = [[k, fmt(v)] for k, v in summary.items()]
    return blocks + [Block("table", columns=["key", "value"], rows=rows)]


def config_section(run: RunDir) -> list[Block]:
    try:
        text = run.config_path.read_text()
    except OSError:
        text = "(config.toml is unreadable)"
    return [Block("h2", "Configuration"), Block("pre", text.rstrip("\n"))]


def build_blocks(run: RunDir, figures: list[tuple[str, Path]]) -> list[Block]:
    meta = run.meta()
    facts = [f"path: {run.path}", f"status: {_status_text(run)}"]
    lineage = run.lineage()
    if lineage:
        chain = " ← ".join([run.name] + [f"{a.name}@{s}" for a, s in reversed(run.ancestry())])
        parent = lineage.get("parent") or {}
        facts.append(
            f"forked from {parent.get('run')} at step {parent.get('step')}"
            + (" (from scratch)" if lineage.get("from_scratch") else "")
            + f"; lineage: {chain}"
        )
    if meta.get("created"):
        facts.append(f"created: {meta['created']}, kiln {meta.get('kiln_version', '?')}")
    blocks = [Block("list", items=facts), Block("h2", "Curves")]
    if figures:
        blocks += [Block("img", caption, image=path) for caption, path in figures]
    else:
        blocks.append(Block("p", "none: no training steps were logged"))
    blocks += evaluation_section(run) + mixture_section(run) + events_section(run) + lineage_section(run)
    blocks += summary_section(run) + config_section(run)
    return blocks


# --------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: list[Block], out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "list":
            lines += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            lines += ["| " + " | ".join(_md_cell(c) for c in b.columns) + " |", "|" + "---|" * len(b.columns)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows] + [""]
        elif b.kind == "img" and b.image is not None:
            lines += [f"![{b.text}]({b.image.relative_to(out_dir).as_posix()})", ""]
        elif b.kind == "pre":
            fence = "````" if "```" in b.text else "```"
            lines += [fence + "toml", b.text, fence, ""]
    return "\n".join(lines)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: .8em; overflow-x: auto; font-size: 12px; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 13px; }
img { max-width: 100%; }
"""


def render_html(title: str, blocks: list[Block]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{esc(c)}</th>" for c in b.columns)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "img" and b.image is not None:
            data = base64.b64encode(b.image.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(b.text, quote=True)}">'
                f"<figcaption>{esc(b.text)}</figcaption></figure>"
            )
        elif b.kind == "pre":
            out.append(f"<pre><code>{esc(b.text)}</code></pre>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- entry point


def write_report(run_path: Path, out_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """report.md, its figures and a self-contained report.html of one run, in out_dir
    (default RUN/report/). Sections without data (no evaluations, no summary of a killed run,
    no layer statistics) say "none" or are left out."""
    run = RunDir.open(Path(run_path))
    out_dir = Path(out_dir) if out_dir is not None else run.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = make_figures(run, out_dir)
    blocks = build_blocks(run, figures)
    title = f"Kiln run report: {run.name}"
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_atomic(md, render_markdown(title, blocks, out_dir))
    write_atomic(page, render_html(title, blocks))
    log(f"report of {run.name}: {md} and {page}")
    return {"md": md, "html": page, "figures": [p for _, p in figures], "dir": out_dir}
