"""What every doctor rule builds its findings with: the finding record (evidence rounded for
people and JSON; a remedy `kiln fork` refused becomes evidence) and the small number helpers
(robust statistics on short lists, LR and TOML formatting, batch ranges)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from kiln.data.skips import add_range

SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}  # findings print in this order


def num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def finite(x: Any) -> bool:
    v = num(x)
    return v is not None and math.isfinite(v)


def sig(x: Any, digits: int = 4) -> Any:
    """A number rounded for people (and JSON): 4 significant digits; non-finite ones as text."""
    v = num(x)
    if v is None:
        return x
    if not math.isfinite(v):
        return str(v)
    return float(f"{v:.{digits}g}") if isinstance(x, float) else x


median = statistics.median


def mad(xs: list[float], center: float) -> float:
    return statistics.median([abs(x - center) for x in xs])


THEIL_SEN_POINTS = 150


def theil_sen(xs: list[float], ys: list[float], max_points: int = THEIL_SEN_POINTS) -> float:
    """The median of pairwise slopes (robust to outliers); subsampled to keep it O(max_points^2)."""
    if len(xs) > max_points:
        idx = [round(i * (len(xs) - 1) / (max_points - 1)) for i in range(max_points)]
        xs, ys = [xs[i] for i in idx], [ys[i] for i in idx]
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]
    ]
    return median(slopes) if slopes else 0.0


def fmt_lr(x: float) -> str:
    return f"{x:.2g}"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def ranges_of(indices: list[int], margin: int = 0) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        out = add_range(out, max(0, i - margin), i + margin)
    return out


def finding(
    kind: str,
    severity: str,
    steps: tuple[int, int] | list[int],
    evidence: dict[str, Any],
    summary: str,
    remedy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    evidence = dict(evidence)
    if remedy is not None and "error" in remedy:
        evidence["remedy_refused"] = remedy["error"]
        remedy = None
    return {
        "kind": kind,
        "severity": severity,
        "steps": [int(steps[0]), int(steps[1])],
        "evidence": {k: ([sig(x) for x in v] if isinstance(v, list) else sig(v)) for k, v in evidence.items()},
        "summary": summary,
        "remedy": remedy,
    }
