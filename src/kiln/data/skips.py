"""Which data batch each optimizer step trains on, when some batches are never trained on (ranges
a rollback skipped, a fork's --skip-batches): the data order's arithmetic, and the one reader of
the ranges a checkpoint recorded."""

from __future__ import annotations

from typing import Any


def data_index(step: int, skipped: list[list[int]]) -> int:
    """The data batch used by optimizer step `step`: the step-th batch index outside the
    (sorted, disjoint, inclusive) skipped ranges."""
    idx = step
    for lo, hi in skipped:
        if idx >= lo:
            idx += hi - lo + 1
    return idx


def add_range(skipped: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    """Merge [lo, hi] into the skipped ranges."""
    merged: list[list[int]] = []
    for a, b in sorted(skipped + [[lo, hi]]):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def skipped_ranges(trainer_state: dict[str, Any]) -> list[list[int]]:
    """The skipped ranges a checkpoint's trainer state recorded (states before they moved out of
    the guard's keep them there)."""
    ranges = trainer_state.get("skipped", (trainer_state.get("guard") or {}).get("skipped", []))
    return [list(r) for r in ranges]
