"""A backtest of a scaling fit: fit without the largest-compute points, then predict them.

Bootstrap intervals measure how far the fit moves with the points' noise; they cannot see a law
of the wrong form for the points (BENCHMARKS, "Scaling laws": three seeds of one CPU ladder gave a
tight interval that missed the held-out run). Extrapolating from the smaller runs to the largest
ones the ladder already has is the one check of extrapolation that costs no new run: if the fit
cannot reach its own top budget, a prediction ten times beyond it deserves less trust still.

Held out: the largest IsoFLOP group (and anything of at least its compute) where the points form
two or more groups, otherwise the largest-compute quarter of the points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.errors import ConfigError
from kiln.scaling.law import BOOTSTRAP, ISO_TOLERANCE, Point, check_points, fit, isoflop_groups

HOLD_OUT_SHARE = 0.25  # without IsoFLOP groups: this share of the points, the largest compute first


def split(points: list[Point]) -> tuple[list[Point], list[Point]]:
    """(points to fit, points to predict)."""
    groups = isoflop_groups(points)
    if len(groups) >= 2:
        threshold = min(p.compute for p in groups[-1]) * (1 - ISO_TOLERANCE)
    else:
        ordered = sorted(points, key=lambda p: p.compute)
        threshold = ordered[-max(1, round(HOLD_OUT_SHARE * len(points)))].compute
    held = [p for p in points if p.compute >= threshold]
    return [p for p in points if p.compute < threshold], held


def backtest(
    points: list[Point], bootstrap: int = BOOTSTRAP, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Each held-out point's predicted and actual loss, the error and whether the 95% interval held it.
    Raises ConfigError (with the reason) when the points left over cannot fit the law."""
    check_points(points)
    rest, held = split(points)
    try:
        check_points(rest)
    except ConfigError as e:
        raise ConfigError(f"no backtest: without the {len(held)} largest-compute point(s), {e}") from None
    law = fit(rest, bootstrap=bootstrap, progress=progress)
    rows: list[dict[str, Any]] = []
    for p in sorted(held, key=lambda p: p.params):
        predicted = law.loss(p.params, p.tokens)
        lo, hi = law.interval(p.params, p.tokens)
        rows.append(
            {
                "name": p.name,
                "params": p.params,
                "tokens": p.tokens,
                "compute": p.compute,
                "loss": p.loss,
                "predicted": predicted,
                "interval": [lo, hi],
                "error": predicted / p.loss - 1,
                "inside": lo <= p.loss <= hi,
            }
        )
    errors = [abs(r["error"]) for r in rows]
    return {
        "fit_points": len(rest),
        "held_out": rows,
        "mean_abs_error": sum(errors) / len(errors),
        "max_abs_error": max(errors),
        "inside": sum(r["inside"] for r in rows),
        "bootstrap": len(law.bootstrap),
        "extrapolation": min(p.compute for p in held) / max(p.compute for p in rest),
        "law": {k: getattr(law, k) for k in ("E", "A", "B", "alpha", "beta")},
    }


def describe_backtest(result: dict[str, Any]) -> str:
    rows = result["held_out"]
    lines = [
        f"backtest: fitted on the {result['fit_points']} smaller-compute points, predicting the {len(rows)} "
        f"largest ({result['extrapolation']:.2g}x the fitted compute): mean |error| "
        f"{result['mean_abs_error']:.1%}, max {result['max_abs_error']:.1%}; "
        + (
            f"the 95% interval held {result['inside']} of {len(rows)}"
            if result["bootstrap"]
            else "no intervals (no bootstrap)"
        )
    ]
    for r in rows:
        lines.append(
            f"  N = {r['params']:.3g}, D = {r['tokens']:.3g}: predicted {r['predicted']:.4f} "
            f"[{r['interval'][0]:.4f}, {r['interval'][1]:.4f}], actual {r['loss']:.4f} ({r['error']:+.1%})"
        )
    return "\n".join(lines)
