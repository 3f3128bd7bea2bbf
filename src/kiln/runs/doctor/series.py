"""Robust statistics over a long run's series for `kiln doctor`, on arrays, with the numbers
the record-by-record rules computed: a median here is statistics.median's (the middle value, or
the mean of the two middle values as (a + b) / 2), so findings do not change with the length
of the run, only the time they take."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BLOCK = 1 << 15  # windows handled at a time: bounds the memory of a million-point series


def logs(x: np.ndarray) -> np.ndarray:
    """math.log of every value, a block at a time: numpy's log differs from the C library's in the
    last bit of some values, and a finding's numbers should not depend on which computed them."""
    out = np.empty(len(x))
    for a in range(0, len(x), BLOCK):
        out[a : a + BLOCK] = np.fromiter(map(math.log, x[a : a + BLOCK].tolist()), np.float64)
    return out


def first_where(values: np.ndarray, test: Callable[[float], bool]) -> int | None:
    """The index of the first value that passes `test` (called on Python floats), or None."""
    for a in range(0, len(values), BLOCK):
        for i, v in enumerate(values[a : a + BLOCK].tolist()):
            if test(v):
                return a + i
    return None


def median(values: np.ndarray) -> float:
    """statistics.median of a non-empty array, as a Python float."""
    n = len(values)
    if n % 2:
        return float(np.partition(values, n // 2)[n // 2])
    part = np.partition(values, [n // 2 - 1, n // 2])
    return float((part[n // 2 - 1] + part[n // 2]) / 2)


def median_and_deviation(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 x the median absolute deviation from it) of a non-empty array, which it
    reuses as scratch space."""
    med = median(values)
    values -= med
    return med, 1.4826 * median(np.abs(values, out=values))


def blockwise(values: np.ndarray) -> Iterator[float]:
    """The values as Python floats, a block at a time (for Python's own sum, without a
    million-item list)."""
    for a in range(0, len(values), BLOCK):
        yield from values[a : a + BLOCK].tolist()


def _middle(part: np.ndarray, width: int) -> np.ndarray:
    h = width // 2
    return part[:, h] if width % 2 else (part[:, h - 1] + part[:, h]) / 2


def _kth(width: int) -> list[int]:
    h = width // 2
    return [h] if width % 2 else [h - 1, h]


def window_medians(x: np.ndarray, width: int) -> np.ndarray:
    """The median of every window x[i:i + width], for the len(x) - width + 1 of them."""
    windows = sliding_window_view(x, width)
    meds = np.empty(len(windows))
    for a in range(0, len(windows), BLOCK):
        meds[a : a + BLOCK] = _middle(np.partition(windows[a : a + BLOCK], _kth(width), axis=1), width)
    return meds


def running_median(x: np.ndarray, half: int) -> np.ndarray:
    """median(x[max(0, i - half) : i + half + 1]) for every i: a centred running median whose
    windows shrink at the ends."""
    n = len(x)
    out = np.empty(n)
    width = 2 * half + 1
    if n >= width:
        out[half : n - half] = window_medians(x, width)
    for i in [*range(min(half, n)), *range(max(half, n - half), n)]:
        out[i] = statistics.median(x[max(0, i - half) : i + half + 1].tolist())
    return out


def row_medians(matrix: np.ndarray) -> np.ndarray:
    """The median of each row's non-NaN values (NaN for a row without any)."""
    rows, cols = matrix.shape
    s = np.sort(matrix, axis=1)  # NaN sorts last
    count = (~np.isnan(matrix)).sum(axis=1)
    out = np.full(rows, np.nan)
    r = np.arange(rows)
    odd = count % 2 == 1
    mid = np.clip(count // 2, 0, max(cols - 1, 0))
    out[odd] = s[r[odd], mid[odd]]
    even = (count % 2 == 0) & (count > 0)
    out[even] = (s[r[even], mid[even] - 1] + s[r[even], mid[even]]) / 2
    return out


def spikes_of(
    steps: np.ndarray,
    losses: np.ndarray,
    window: int,
    min_history: int,
    z: float,
    min_jump: float,
    recovery: int,
) -> list[tuple[int, float, float]]:
    """(step, loss, recent level) of every loss far above the robust level of the `window`
    losses before it (its median; far: >= min_jump in log and >= z robust deviations) that comes
    back halfway within `recovery` points; a spike never enters the windows of later points.

    Sequential by definition (a spike leaves the history), but spikes are rare: every point is
    judged at once as if none had been left out, and only the points whose window holds a
    spike are judged again one by one."""
    n = len(losses)
    values = logs(np.maximum(np.asarray(losses, np.float64), 1e-6))
    plain = np.zeros(n, bool)  # a spike if no earlier point had been left out
    if n > window:
        # a jump above the window's median is at most the jump above its minimum: only points
        # >= min_jump above the lowest of the `window` before them can be spikes
        low = values[: n - window].copy()
        for d in range(1, window):
            np.minimum(low, values[d : n - window + d], out=low)
        maybe = np.flatnonzero(values[window:] - low >= min_jump) + window
        del low
        windows = sliding_window_view(values[:-1], window)
        ahead = np.concatenate([values, np.full(recovery, np.inf)])  # no point after the last: never "back"
        for a in range(0, len(maybe), BLOCK):
            points = maybe[a : a + BLOCK]
            block = windows[points - window]
            med = _middle(np.partition(block, _kth(window), axis=1), window)
            mad = _middle(np.partition(np.abs(block - med[:, None]), _kth(window), axis=1), window)
            jump = values[points] - med
            later = np.min(np.stack([ahead[points + d] for d in range(1, recovery + 1)]), axis=0)
            # it comes back: any of the next `recovery` points at or below halfway, or fewer than 2 follow
            back = (later <= med + 0.5 * jump) | (n - 1 - points < 2)
            plain[points] = (jump >= min_jump) & (jump >= z * 1.4826 * mad) & back
    candidates = np.flatnonzero(plain).tolist()
    left_out: list[int] = []
    left_set: set[int] = set()

    def judge(i: int) -> float | None:
        """The recent level (log) when point i is a spike, judged exactly as the definition says."""
        history: list[float] = []
        j = i - 1
        while j >= 0 and len(history) < window:
            if j not in left_set:
                history.append(float(values[j]))
            j -= 1
        history.reverse()
        if len(history) < min_history:
            return None
        med = statistics.median(history)
        jump = float(values[i]) - med
        if jump >= min_jump and jump >= z * 1.4826 * statistics.median([abs(v - med) for v in history]):
            later = values[i + 1 : i + 1 + recovery].tolist()
            if len(later) < 2 or any(v <= med + 0.5 * jump for v in later):
                return med
        return None

    out = []
    i, c = 0, 0
    while i < n:
        if i < window or (left_out and i - left_out[-1] <= window):
            pass  # the window is still short, or may hold a spike: judge this point exactly
        else:  # the plain judgement holds up to the next candidate
            while c < len(candidates) and candidates[c] < i:
                c += 1
            if c == len(candidates):
                break
            i = candidates[c]
        level = judge(i)
        if level is not None:
            out.append((int(steps[i]), float(losses[i]), math.exp(level)))
            left_out.append(i)
            left_set.add(i)
        i += 1
    return out
