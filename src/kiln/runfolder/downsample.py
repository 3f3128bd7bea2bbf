"""Long curves thinned for drawing: per pixel column the first, lowest, highest and last point,
in their order, so a line drawn through them looks as the whole curve would (a one-step spike
keeps its height) from a few thousand points instead of a million. A non-finite value keeps a
point too: matplotlib leaves a gap there, and the gap should stay."""

from __future__ import annotations

import numpy as np

POINTS_PER_COLUMN = 4


def minmax(xs: np.ndarray, ys: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ~5 points of (xs, ys) per column of `columns` across the x range (across the
    positions when xs go back somewhere); a curve that fits is returned as it is."""
    n = len(xs)
    if n <= POINTS_PER_COLUMN * columns:
        return xs, ys
    lo, hi = (float(xs[0]), float(xs[-1])) if n else (0.0, 0.0)
    if hi > lo and bool(np.all(xs[1:] >= xs[:-1])):
        edges = np.searchsorted(xs, lo + (hi - lo) * np.arange(1, columns) / columns)
    else:
        edges = (np.arange(1, columns) * n) // columns
    bounds = np.concatenate([[0], edges, [n]]).tolist()
    keep: list[int] = []
    for a, b in zip(bounds, bounds[1:]):
        if b <= a:
            continue
        part = ys[a:b]
        finite = np.isfinite(part)
        picked = {a, b - 1}
        if finite.all():
            picked.update((a + int(np.argmin(part)), a + int(np.argmax(part))))
        else:
            picked.add(a + int(np.argmin(finite)))  # the first gap
            if finite.any():
                values = np.where(finite, part, np.nan)
                picked.update((a + int(np.nanargmin(values)), a + int(np.nanargmax(values))))
        keep.extend(sorted(picked))
    index = np.array(keep, np.int64)
    return xs[index], ys[index]
