"""Packing whole samples into fixed-length windows, as a pure function of (lengths, seed, epoch).

Each epoch shuffles the training samples with a generator seeded by (seed, epoch) and packs them
into windows of `seq_len + 1` positions, one window at a time from a look-ahead buffer: the
longest buffered sample that fits goes in until none does. The epoch's windows are then shuffled
by the same generator. No sample is split, so an image is never cut across
windows, and every sample is in exactly one window of its epoch. A sample longer than a window
gets one to itself (the loader keeps what fits).

The windows of all epochs form one global stream; the global batch at step `s` is windows
`[s*B, (s+1)*B)`, so a batch depends only on (seed, step) and not on the number of data-parallel
ranks: a run resumed on another world size continues the same stream.
"""

from __future__ import annotations

import bisect

import numpy as np


def pack(lengths: np.ndarray, order: np.ndarray, window: int, buffer: int = 512,
         rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples `order` (ids into `lengths`) packed into windows of `window` positions:
    (the samples in window order, int64 offsets of each window into them (n_windows + 1)).

    One window is filled at a time from a buffer of the next `buffer` samples in `order`: the
    longest buffered sample that still fits goes in, until none does; then the window is closed
    and the buffer refilled. `rng`, when given, then shuffles the windows, so batches carry no
    trace of the longest-first choice."""
    caps = np.minimum(lengths, window)
    pending: list[tuple[int, int, int]] = []  # (length, arrival, sample), sorted
    out: list[int] = []
    offsets = [0]
    feed = iter(order.tolist())
    arrival = 0

    def refill() -> None:
        nonlocal arrival
        while len(pending) < buffer:
            sample = next(feed, None)
            if sample is None:
                return
            bisect.insort(pending, (int(caps[sample]), arrival, sample))
            arrival += 1

    refill()
    while pending:
        room = window
        while pending:
            i = bisect.bisect_right(pending, (room, 1 << 62, 0)) - 1  # the longest that fits
            if i < 0:
                break
            length, _, sample = pending.pop(i)
            out.append(sample)
            room -= length
            if not room:
                break
        offsets.append(len(out))
        refill()
    samples, bounds = np.asarray(out, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    if rng is None:
        return samples, bounds
    perm = rng.permutation(len(bounds) - 1)
    sizes = np.diff(bounds)[perm]
    shuffled = np.concatenate([samples[bounds[w]:bounds[w + 1]] for w in perm]) if len(perm) else samples
    return shuffled, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def efficiency(lengths: np.ndarray, offsets: np.ndarray, window: int) -> float:
    """Share of the windows' positions that hold sample tokens (not padding)."""
    used = np.minimum(lengths, window).sum()
    return float(used) / max(1, (len(offsets) - 1) * window)


class EpochPlans:
    """The packed windows of every epoch of one split, computed on demand and cached."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, window: int, seed: int, shuffle: bool = True):
        self.ids, self.window, self.seed, self.shuffle = ids, window, seed, shuffle
        self.lengths = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=np.int64)
        self.lengths[ids] = lengths
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._starts = [0]  # global index of each planned epoch's first window

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
            order = rng.permutation(self.ids) if rng is not None else self.ids
            self._plans[epoch] = pack(self.lengths, order, self.window, rng=rng)
            if len(self._plans) > 4:  # keep a few epochs; older ones are recomputed if asked for again
                self._plans.pop(min(k for k in self._plans if k != epoch))
        return self._plans[epoch]

    def windows_in(self, epoch: int) -> int:
        while len(self._starts) <= epoch + 1:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.plan(e)[1]) - 1)
        return self._starts[epoch + 1] - self._starts[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """Global window `index` -> (epoch, window within the epoch)."""
        epoch = 0
        while True:
            self.windows_in(epoch)
            if index < self._starts[epoch + 1]:
                return epoch, index - self._starts[epoch]
            epoch += 1

    def window_samples(self, index: int) -> tuple[int, np.ndarray]:
        """(epoch, the samples of global window `index`)."""
        epoch, w = self.locate(index)
        samples, offsets = self.plan(epoch)
        return epoch, samples[offsets[w]:offsets[w + 1]]

    def epoch_of(self, index: int) -> float:
        epoch, w = self.locate(index)
        return epoch + w / self.windows_in(epoch)
