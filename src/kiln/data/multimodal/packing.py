"""Packing whole samples into fixed-length windows, as a pure function of (lengths, seed, epoch).

Each epoch shuffles the training samples with a generator seeded by (seed, epoch) and packs them
into windows of `seq_len + 1` positions, best-fit decreasing over a buffer of samples at a time.
The epoch's windows are then shuffled by the same generator. No sample is split, so an image is never cut across
windows, and every sample is in exactly one window of its epoch. A sample longer than a window
gets one to itself (the loader keeps what fits).

The windows of all epochs form one global stream; the global batch at step `s` is windows
`[s*B, (s+1)*B)`, so a batch depends only on (seed, step) and not on the number of data-parallel
ranks: a run resumed on another world size continues the same stream.
"""

from __future__ import annotations

import bisect

import numpy as np


def pack(
    lengths: np.ndarray, order: np.ndarray, window: int, buffer: int = 1024, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Samples `order` (ids into `lengths`) packed into windows of `window` positions:
    (the samples in window order, int64 offsets of each window into them (n_windows + 1)).

    Best-fit decreasing, `buffer` samples at a time: the buffer's samples, longest first, each go
    to the open window they fill most tightly (a new one when none has room); the buffer's windows
    are then closed. `rng`, when given, shuffles the windows, so batches carry no trace of the sort."""
    caps = np.minimum(lengths, window)
    out: list[np.ndarray] = []
    sizes: list[int] = []
    for chunk in np.array_split(order, max(1, -(-len(order) // buffer))):
        chunk = chunk[np.argsort(-caps[chunk], kind="stable")]
        room = np.empty(len(chunk), dtype=np.int64)  # at most one window per sample
        members: list[list[int]] = []
        for sample in chunk.tolist():
            need = caps[sample]
            open_room = room[: len(members)]
            fits = np.flatnonzero(open_room >= need)
            if len(fits):
                slot = int(fits[open_room[fits].argmin()])
            else:
                slot = len(members)
                members.append([])
                room[slot] = window
            members[slot].append(sample)
            room[slot] -= need
        out += [np.asarray(m, dtype=np.int64) for m in members]
        sizes += [len(m) for m in members]
    if rng is not None and out:
        perm = rng.permutation(len(out))
        out, sizes = [out[w] for w in perm], [sizes[w] for w in perm]
    samples = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return samples, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


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
        while self._starts[-1] <= index:  # plan epochs until one holds the window
            self.windows_in(len(self._starts) - 1)
        epoch = bisect.bisect_right(self._starts, index) - 1
        return epoch, index - self._starts[epoch]

    def window_samples(self, index: int) -> tuple[int, np.ndarray]:
        """(epoch, the samples of global window `index`)."""
        epoch, w = self.locate(index)
        samples, offsets = self.plan(epoch)
        return epoch, samples[offsets[w] : offsets[w + 1]]

    def epoch_of(self, index: int) -> float:
        epoch, w = self.locate(index)
        return epoch + w / self.windows_in(epoch)
