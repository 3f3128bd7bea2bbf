"""The summary table `kiln train` prints at the end of a run (the loss plot is drawn by the
`plot` callback, kiln.train.callbacks.plot)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def summary_table(summary: dict[str, Any], title: str = "Kiln run") -> Table:
    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    rows = [
        ("steps", fmt(summary["steps"], ",")),
        ("tokens", fmt(summary["tokens"], ",")),
        ("train loss", fmt(summary.get("train_loss"), ".4f")),
        ("validation loss", fmt(summary.get("val_loss"), ".4f")),
        ("unigram entropy (val)", fmt(summary.get("unigram_entropy"), ".4f") + "  (loss of a context-free model)"),
        ("validation perplexity", fmt(summary.get("val_ppl"), ".2f")),
        ("validation accuracy", fmt(summary.get("val_acc"), ".3f")),
        ("tokens/s", fmt(summary.get("tokens_per_s"), ",.0f")),
        ("achieved TFLOP/s", fmt(summary.get("tflops"), ".3f")),
        (
            "MFU",
            "unknown" if summary.get("mfu") is None else f"{100 * summary['mfu']:.1f}%  vs {summary['peak_source']}",
        ),
        ("peak memory", fmt(summary.get("peak_mem_gb"), ".2f") + " GiB"),
        ("device / precision", f"{summary.get('device')} / {summary.get('precision')}"),
    ]
    budget = summary.get("time_budget")
    if budget:
        rows.insert(
            1,
            (
                "time budget",
                f"{budget['steps']} steps fit in {budget['budget_s']:.0f}s "
                f"({budget['seconds_per_step']:.3f} s/step measured)",
            ),
        )
    for extra in ("val_masked_acc", "majority_baseline"):
        if extra in summary:
            rows.append((extra.replace("_", " "), fmt(summary[extra], ".3f")))
    if summary.get("sample"):
        rows.append(("sample", repr(summary["sample"]["text"][:300])))
    for name, value in rows:
        table.add_row(name, value)
    return table
