"""`kiln compare`: what differs between runs (their configs), how they did (headline figures
and evaluation suites), and their curves overlaid on one tokens axis, each fork drawn from its
fork point with its ancestors' curve before it -> compare.png and compare.md."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.fileio import write_atomic
from kiln.runfolder.downsample import minmax
from kiln.runs.curves import Curve, lineage_curves, number, pyplot, save_figure, series_keys, source_of
from kiln.runs.rundir import RunDir

FIG_WIDTH, SUBPLOT_HEIGHT, DPI = 8.0, 3.5, 100  # compare.png is 800 x 350·(subplots) pixels
BPB = "lm/bits_per_byte"
DASH = "—"


# --------------------------------------------------------------------------- config differences


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: {"callbacks": {"layer_stats": {"every": 5}}} ->
    {"callbacks.layer_stats.every": 5}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _resolved(run: RunDir) -> dict[str, Any]:
    """The run's config with defaults filled in (a run made before a key existed has its
    default), or the file as written when it no longer parses."""
    from kiln.config import to_dict
    from kiln.errors import ConfigError

    try:
        return to_dict(run.config())
    except ConfigError:
        return run.config_dict()


def config_differences(runs: list[RunDir]) -> dict[str, list[Any]]:
    """Every dotted config key whose value is not the same in all runs (None where a run lacks
    the key), in the order of the first run's file, then keys only later runs have."""
    flat = [flatten(_resolved(r)) for r in runs]
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    missing = object()
    diffs = {}
    for k in keys:
        values = [f.get(k, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diffs[k] = [None if v is missing else v for v in values]
    return diffs


# --------------------------------------------------------------------------- headlines


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def tokenizer_warnings(runs: list[RunDir], labels: list[str]) -> list[str]:
    """One warning per pair of distinct tokenizers (named by the first run using each)."""
    groups: dict[str, str] = {}
    for run, label in zip(runs, labels):
        digest = _sha256(run.tokenizer_path)
        if digest is not None:
            groups.setdefault(digest, label)
    firsts = list(groups.values())
    return [
        f"warning: runs {a} and {b} use different tokenizers; their losses per token are not comparable"
        for i, a in enumerate(firsts)
        for b in firsts[i + 1 :]
    ]


COUNTS = ("tokens", "bytes", "count", "n", "loss")  # sizes of an evaluation (and lm/loss = val_loss), not results


def headline(run: RunDir, label: str) -> dict[str, Any]:
    """One run's row: final and best validation loss (and bits per byte), progress, speed,
    status, lineage and the suites' numbers of its last evaluation."""
    summary, evals, metrics = run.summary() or {}, run.evals(), run.metrics_table()
    last_eval, last_metrics = (evals[-1] if evals else {}), (metrics.record(-1) if metrics.rows else {})

    def final_best(key: str) -> tuple[float | None, float | None]:
        values = [v for v in (number(e.get(key)) for e in evals) if v is not None]
        return number(last_eval.get(key)), (min(values) if values else None)

    final_val, best_val = final_best("val_loss")
    final_bpb, best_bpb = final_best(BPB)
    status = run.status()
    lineage = run.lineage() or {}
    parent = lineage.get("parent") or {}
    steps = summary.get("steps", last_metrics.get("step", status.get("step")))
    tokens = last_metrics.get("tokens", summary.get("tokens"))
    return {
        "run": label,
        "name": run.name,
        "path": str(run.path),
        "final_val_loss": final_val,
        "best_val_loss": best_val,
        "final_bpb": final_bpb,
        "best_bpb": best_bpb,
        "last_eval_step": last_eval.get("step"),
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": number(summary.get("tokens_per_s")),
        "mfu": number(summary.get("mfu")),
        "status": status.get("state"),
        "parent": parent.get("run"),
        "fork_step": parent.get("step"),
        "from_scratch": bool(lineage.get("from_scratch")),
        "suites": {k: v for k, v in last_eval.items() if "/" in k and k.rsplit("/", 1)[1] not in COUNTS},
    }


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, spec) if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _parent_cell(h: dict[str, Any]) -> str:
    if not h["parent"]:
        return DASH
    return f"{h['parent']} (scratch)" if h["from_scratch"] else f"{h['parent']}@{h['fork_step']}"


def headline_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column names and cells of the headline table (shared by compare.md and the rich table)."""
    heads = result["headlines"]
    suite_keys: list[str] = []
    for h in heads:
        suite_keys.extend(k for k in h["suites"] if k not in suite_keys)
    loss_cols = ["final val loss", "best val loss"]
    if result["headline_loss"] == BPB:  # tokenizers differ: bits per byte first, losses per token after
        loss_cols = ["final bits/byte", "best bits/byte", "final val loss (per token)", "best val loss (per token)"]
        suite_keys = [k for k in suite_keys if k != BPB]
    columns = ["run", *loss_cols, "steps", "tokens", "tokens/s", "MFU", "status", "parent@step", *suite_keys]
    rows = []
    for h in heads:
        losses = [_fmt(h["final_val_loss"]), _fmt(h["best_val_loss"])]
        if result["headline_loss"] == BPB:
            losses = [_fmt(h["final_bpb"]), _fmt(h["best_bpb"]), *losses]
        mfu = DASH if h["mfu"] is None else f"{100 * h['mfu']:.1f}%"
        tps = DASH if h["tokens_per_s"] is None else f"{h['tokens_per_s']:,.0f}"
        rows.append(
            [
                h["run"],
                *losses,
                _fmt(h["steps"]),
                _fmt(h["tokens"]),
                tps,
                mfu,
                h["status"] or DASH,
                _parent_cell(h),
                *(_fmt(h["suites"].get(k)) for k in suite_keys),
            ]
        )
    return columns, rows


def _value_cell(v: Any) -> str:
    if v is None:
        return DASH
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return _fmt(v, "g") if isinstance(v, (int, float)) and not isinstance(v, bool) else _fmt(v)


def difference_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = ["key", *result["runs"]]
    return columns, [[k, *(_value_cell(v) for v in vs)] for k, vs in result["differences"].items()]


# --------------------------------------------------------------------------- the figure


def _plots(
    runs: list[RunDir], labels: list[str], metrics: list[str] | None, warnings: list[str], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """What each subplot shows: [{"key", "title", "source" per run}], checked before anything is written."""
    if not metrics:
        val_key = "val_loss"
        if warnings and all(BPB in series_keys(r, "evals") for r in runs):
            val_key = BPB
        return [
            {"key": "loss", "title": "training loss", "sources": ["metrics"] * len(runs)},
            {
                "key": val_key,
                "title": "validation bits per byte" if val_key == BPB else "validation loss",
                "sources": ["evals"] * len(runs),
            },
        ]
    plots = []
    for key in metrics:
        sources = [source_of(r, key) for r in runs]
        if not any(sources):
            available = sorted(set().union(*(series_keys(r, s) for r in runs for s in ("metrics", "evals"))))
            raise KilnError(f"no run records a metric '{key}'; available: {', '.join(available) or 'none'}")
        missing = [label for label, source in zip(labels, sources) if source is None]
        if missing:
            log(f"note: {', '.join(missing)} record{'s' if len(missing) == 1 else ''} no '{key}'")
        plots.append({"key": key, "title": key, "sources": sources})
    return plots


def plot_compare(
    runs: list[RunDir], labels: list[str], plots: list[dict[str, Any]], path: Path, note: str = ""
) -> list[dict[str, Any]]:
    """compare.png: one subplot per entry of `plots`, one color per run; a fork's inherited stretch
    is drawn thin and dashed in its color unless that ancestor is itself compared (its own curve is
    there). Returns, per subplot, the segments drawn for each run."""
    plt = pyplot()
    compared = {r.path.resolve() for r in runs}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(plots), 1, figsize=(FIG_WIDTH, SUBPLOT_HEIGHT * len(plots)), squeeze=False)
    drawn_all = []
    for ax, plot in zip(axes[:, 0], plots):
        drawn: dict[str, list[dict[str, Any]]] = {}
        axis_names = set()
        for i, (run, label, source) in enumerate(zip(runs, labels, plot["sources"])):
            if source is None:
                continue
            color = colors[i % len(colors)]
            segments = lineage_curves(run, source, plot["key"])
            drawn[label] = []
            previous: Curve | None = None
            for seg in segments:
                axis_names.add(seg.x)
                if seg.inherited and seg.path is not None and seg.path.resolve() in compared:
                    previous = seg  # the ancestor's own curve is drawn already
                    continue
                xs, ys = minmax(seg.xs, seg.ys, int(FIG_WIDTH * DPI))  # a long run: spikes kept, pixels not wasted
                if previous is not None and len(previous.xs) and len(xs):  # join the curve at the fork point
                    xs, ys = np.concatenate([previous.xs[-1:], xs]), np.concatenate([previous.ys[-1:], ys])
                style = dict(lw=0.9, ls="--", alpha=0.7) if seg.inherited else dict(lw=1.4)
                marker = "o" if source == "evals" else None
                name = f"{label} (from {seg.run})" if seg.inherited else label
                ax.plot(xs, ys, color=color, marker=marker, ms=3, label=name, **style)
                drawn[label].append({"run": seg.run, "inherited": seg.inherited, "points": len(seg.xs)})
                previous = seg
        ax.set_title(plot["title"] + note if plot["key"] == "loss" and note else plot["title"])
        ax.set_xlabel("tokens" if axis_names <= {"tokens"} else "step (some records lack tokens)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        drawn_all.append({"key": plot["key"], "runs": drawn})
    fig.tight_layout()
    save_figure(fig, path, DPI)
    plt.close(fig)
    return drawn_all


# --------------------------------------------------------------------------- markdown, rich


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compare_markdown(result: dict[str, Any], image: str = "compare.png") -> str:
    parts = [f"# Comparison: {', '.join(result['runs'])}", ""]
    parts += [f"> {w}" for w in result["warnings"]] + ([""] if result["warnings"] else [])
    parts += ["## Headlines", "", md_table(*headline_rows(result)), "", "## Config differences", ""]
    if result["differences"]:
        parts += [md_table(*difference_rows(result)), ""]
    else:
        parts += ["none: the configurations are identical", ""]
    parts += ["## Curves", "", f"![training and validation curves]({image})", ""]
    return "\n".join(parts)


def compare_tables(result: dict[str, Any]) -> list[Any]:
    """The headline and config-difference tables as rich Tables, for the terminal."""
    from rich.table import Table

    tables = []
    for title, (columns, rows) in (
        ("Headlines", headline_rows(result)),
        ("Config differences", difference_rows(result)),
    ):
        table = Table(title=title, title_justify="left")
        for i, c in enumerate(columns):
            table.add_column(
                c, style="bold" if i == 0 else None, justify="left" if i == 0 or title != "Headlines" else "right"
            )
        for row in rows:
            table.add_row(*row)
        if not rows:
            table.add_row("identical", *[""] * (len(columns) - 1))
        tables.append(table)
    return tables


# --------------------------------------------------------------------------- entry point


def _labels(runs: list[RunDir]) -> list[str]:
    """Run names, with the parent folder where two compared runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def compare_runs(
    paths: list[Path], out_dir: Path, metrics: list[str] | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Compare two or more runs: config differences, headlines, suites, tokenizer warnings;
    writes out_dir/compare.png and out_dir/compare.md (nothing when an input is wrong)."""
    if len(paths) < 2:
        raise KilnError(f"kiln compare needs at least two runs, got {len(paths)}")
    runs = [RunDir.open(Path(p)) for p in paths]
    resolved = [r.path.resolve() for r in runs]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise KilnError(f"run '{paths[i]}' is given twice; compare different runs")
    labels = _labels(runs)
    warnings = tokenizer_warnings(runs, labels)
    plots = _plots(runs, labels, metrics, warnings, log)  # a wrong --metric fails here, before any file exists
    out_dir = Path(out_dir)
    heads = [headline(r, label) for r, label in zip(runs, labels)]
    result: dict[str, Any] = {
        "runs": labels,
        "paths": [str(r.path) for r in runs],
        "differences": config_differences(runs),
        "headlines": heads,
        # losses per token of different tokenizers are not comparable: bits per byte are
        "headline_loss": BPB if warnings and any(h["final_bpb"] is not None for h in heads) else "val_loss",
        "warnings": warnings,
        "png": out_dir / "compare.png",
        "md": out_dir / "compare.md",
    }
    for w in warnings:
        log(w)
    out_dir.mkdir(parents=True, exist_ok=True)
    note = " (nats/token; tokenizers differ)" if warnings else ""
    result["plots"] = plot_compare(runs, labels, plots, result["png"], note)
    result["markdown"] = compare_markdown(result, result["png"].name)
    write_atomic(result["md"], result["markdown"])
    return result
