"""Which source each training sample of a weighted mixture comes from, in O(1) memory.

Global sample `g` (the `g % B`-th sequence of data batch `g // B`) is routed down a fixed binary
tree over the sources. Each inner node splits the samples that reach it between its two halves
by the ratio of their weights, with a Bresenham rule in integer arithmetic: of the first `n`
samples that reach the node in a segment of constant weights, `floor((q * n + phase) / 2^20)`
go left (`q` the left share in units of 2^-20, `phase` a per-node offset drawn from the seed).
Counts therefore grow by 0 or 1 a sample, so every source's samples are numbered 0, 1, 2, ...
without gap or repeat, each source's count stays within one sample per tree level of its
weight's share at every batch boundary, and any sample is placed with a few integer operations
per level: no per-sample table, the same answer on every rank and world size, exact on resume.

Weights change only at data-batch boundaries ("segments"): `[[data.stages]]`, a fork that changed
the mix ("eras", recorded in the run), and a source reaching `max_epochs`, whose weight then goes
to 0 for the rest of its era (the others keep their ratios, so its share is divided among them in
proportion to their weights). The k-th sample of source j is window `order_e[k mod n_j]` of that
source, `e = k // n_j` its epoch, the order a Feistel bijection (kiln.data.order).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import DataError

MIX_VERSION = "split-tree-1"
BITS = 20
SCALE = 1 << BITS  # weight ratios in units of 2^-20; products stay below 2^63 up to 2^43 samples a segment
FAR = 1 << 36  # batch indices searched for a source's last epoch (beyond any run)


@dataclass(frozen=True)
class Era:
    """The mix from data batch `start` on (until the next era): base weights, their limits, and
    stages as (first data batch, weights) pairs, resolved to batch indices."""

    start: int
    weights: tuple[float, ...]
    max_epochs: tuple[float, ...]
    stages: tuple[tuple[int, tuple[float, ...]], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "weights": list(self.weights),
            "max_epochs": list(self.max_epochs),
            "stages": [[s, list(w)] for s, w in self.stages],
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Era:
        return Era(
            int(d["start"]),
            tuple(float(w) for w in d["weights"]),
            tuple(float(e) for e in d["max_epochs"]),
            tuple((int(s), tuple(float(x) for x in w)) for s, w in d.get("stages", [])),
        )


def era_from_config(data_cfg: Any, total_steps: int, start: int = 0) -> Era:
    """The config's mix (`data.sources`, `data.stages`) as an era from batch `start` on; stage
    fractions resolve against `total_steps` once, here, and the result is what the run records."""
    names = [s.name for s in data_cfg.sources]
    stages = []
    for st in data_cfg.stages:
        first = st.start if st.start >= 0 else int(round(st.start_fraction * total_steps))
        stages.append((first, tuple(float(st.weights.get(n, 0.0)) for n in names)))
    return Era(
        start,
        tuple(float(s.weight) for s in data_cfg.sources),
        tuple(float(s.max_epochs) for s in data_cfg.sources),
        tuple(stages),
    )


def mixture_fingerprint(data_cfg: Any) -> str:
    """What the mix is as configured (sources' names, weights and limits; stages): resume checks it
    (what the sources hold is checked apart, by the data's content key)."""
    doc = {
        "sources": [[s.name, s.weight, s.max_epochs] for s in data_cfg.sources],
        "stages": [[st.start, st.start_fraction, sorted(st.weights.items())] for st in data_cfg.stages],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class _Tree:
    """Inner nodes of the split tree in preorder: node i covers sources [lo, hi), left = [lo, mid)."""

    lo: list[int] = field(default_factory=list)
    mid: list[int] = field(default_factory=list)
    hi: list[int] = field(default_factory=list)
    left: list[int] = field(default_factory=list)  # child node id, or -(source + 1) for a leaf
    right: list[int] = field(default_factory=list)

    def build(self, lo: int, hi: int) -> int:
        if hi - lo == 1:
            return -(lo + 1)
        node = len(self.lo)
        mid = (lo + hi) // 2
        for a, v in ((self.lo, lo), (self.mid, mid), (self.hi, hi), (self.left, 0), (self.right, 0)):
            a.append(v)
        self.left[node] = self.build(lo, mid)
        self.right[node] = self.build(mid, hi)
        return node


class MixtureSchedule:
    """Where every global sample of a mixture comes from: `route(g)` -> (source, its index in
    that source's stream); `counts(i)` -> samples of each source in batches [0, i)."""

    def __init__(self, eras: list[Era], windows: list[int], global_batch: int, seed: int, names: list[str]):
        if not eras or eras[0].start != 0:
            raise ValueError("a mixture schedule starts with an era at batch 0")
        self.eras, self.windows, self.B, self.names = eras, windows, global_batch, names
        self.S = len(windows)
        self.tree = _Tree()
        self.root = self.tree.build(0, self.S) if self.S > 1 else -1
        self.phase = np.random.default_rng([seed, 0x3117]).integers(0, SCALE, size=max(1, self.S - 1))
        self.end: int | None = None  # the batch at which every source is spent (None: never)
        self.exhausted: list[tuple[int, int]] = []  # (first batch without it, source)
        segments = self._base_segments()
        while True:  # each pass finds the earliest source to run out, until none does
            self._build(segments)
            found = self._first_exhaustion(segments)
            if found is None:
                break
            index, source = found
            self.exhausted.append((index, source))
            segments = self._zero_from(segments, index, source)
            if self.end is None and not any(w > 0 for w in self._weights_at(segments, index)):
                self.end = index
        self._build(segments)
        self.segments = segments

    # ---------------------------------------------------------------- segments
    def _base_segments(self) -> list[tuple[int, tuple[float, ...], int]]:
        """(first batch, weights, era number) wherever the weights may change."""
        out: list[tuple[int, tuple[float, ...], int]] = []
        for e, era in enumerate(self.eras):
            stop = self.eras[e + 1].start if e + 1 < len(self.eras) else None
            active = era.weights
            for first, w in era.stages:  # a stage begun before the era starts is in force at its start
                if first <= era.start:
                    active = w
            out.append((era.start, active, e))
            out.extend((first, w, e) for first, w in era.stages if first > era.start and (stop is None or first < stop))
        return out

    @staticmethod
    def _weights_at(segments: list[tuple[int, tuple[float, ...], int]], index: int) -> tuple[float, ...]:
        return max((s for s in segments if s[0] <= index), key=lambda s: s[0])[1]

    def _zero_from(self, segments: list, index: int, source: int) -> list:
        """`source` weighs nothing from batch `index` to the end of the era holding it."""
        era = next(s[2] for s in reversed(segments) if s[0] <= index)
        out = []
        for first, w, e in segments:
            if e == era and first >= index:
                w = tuple(0.0 if j == source else x for j, x in enumerate(w))
            out.append((first, w, e))
        if not any(first == index for first, _, _ in out):
            w = self._weights_at(segments, index)
            out.append((index, tuple(0.0 if j == source else x for j, x in enumerate(w)), era))
        return sorted(out, key=lambda s: s[0])

    def _build(self, segments: list[tuple[int, tuple[float, ...], int]]) -> None:
        """Per segment and inner node: the left share `q`, and the node's sample count and left
        count at the segment's first sample (carried over from the segment before)."""
        K, N = len(segments), max(1, self.S - 1)
        self.starts = np.array([s[0] for s in segments], dtype=np.int64)
        self.era_of = [s[2] for s in segments]
        self.q = np.zeros((N, K), dtype=np.int64)
        self.n0 = np.zeros((N, K), dtype=object)  # Python integers (see _left)
        self.l0 = np.zeros((N, K), dtype=object)
        t = self.tree
        for k, (first, w, _) in enumerate(segments):
            for v in range(len(t.lo)):
                total = sum(w[t.lo[v] : t.hi[v]])
                self.q[v, k] = round(SCALE * sum(w[t.lo[v] : t.mid[v]]) / total) if total > 0 else 0
            if self.S == 1:
                continue
            reach = {self.root: first * self.B}  # node -> its samples before this segment
            for v in range(len(t.lo)):  # preorder: a parent before its children
                n = reach[v]
                left = self._left(v, k - 1, n) if k else 0
                self.n0[v, k], self.l0[v, k] = n, left
                if t.left[v] >= 0:
                    reach[t.left[v]] = left
                if t.right[v] >= 0:
                    reach[t.right[v]] = n - left
        self.n0i, self.l0i = self.n0.astype(np.int64), self.l0.astype(np.int64)  # route()'s vectorised copies

    def _left(self, v: int, k: int, n: int) -> int:
        """Of node v's first n samples, those sent left, under segment k's rule (Python integers:
        the searches look far beyond any run, where int64 products would overflow)."""
        return int(self.l0[v, k]) + ((int(self.q[v, k]) * (n - int(self.n0[v, k])) + int(self.phase[v])) >> BITS)

    def _segment(self, index: np.ndarray | int) -> Any:
        return np.searchsorted(self.starts, index, side="right") - 1

    # ---------------------------------------------------------------- queries
    def counts(self, index: int) -> np.ndarray:
        """Samples drawn from each source in data batches [0, index)."""
        out = np.zeros(self.S, dtype=np.int64)
        if self.S == 1:
            out[0] = index * self.B
            return out
        k = int(self._segment(index))
        t = self.tree

        def walk(node: int, n: int) -> None:
            if node < 0:
                out[-node - 1] = n
                return
            left = self._left(node, k, n)
            walk(t.left[node], left)
            walk(t.right[node], n - left)

        walk(self.root, index * self.B)
        return out

    def route(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within the source's stream) of each global sample index in `g`."""
        g = np.asarray(g, dtype=np.int64)
        if self.S == 1:
            return np.zeros_like(g), g
        if self.end is not None and np.any(g >= self.end * self.B):
            raise DataError(
                f"every source of the mixture has reached its max_epochs by step {self.end}; raise "
                "data.sources.<name>.max_epochs (or 0 = no limit) or train fewer steps"
            )
        k = self._segment(g // self.B)
        source = np.zeros_like(g)
        n = g.copy()
        t = self.tree
        work = [(self.root, np.arange(len(g)))]
        while work:
            node, rows = work.pop()
            if node < 0:
                source[rows] = -node - 1
                continue
            kk, nn = k[rows], n[rows]
            q, n0, l0, phase = self.q[node, kk], self.n0i[node, kk], self.l0i[node, kk], self.phase[node]
            before = l0 + ((q * (nn - n0) + phase) >> BITS)
            after = l0 + ((q * (nn + 1 - n0) + phase) >> BITS)
            go_left = after > before
            n[rows] = np.where(go_left, before, nn - before)
            work.append((t.left[node], rows[go_left]))
            work.append((t.right[node], rows[~go_left]))
        return source, n

    def weights_at(self, index: int) -> tuple[float, ...]:
        """The weights in force at data batch `index` (stages and spent sources applied)."""
        return self._weights_at(self.segments, index)

    def changes(self) -> dict[int, list[str]]:
        """Batch index -> what changes the mix there (stages, eras, spent sources), for events."""
        out: dict[int, list[str]] = {}
        for e, era in enumerate(self.eras[1:], 1):
            out.setdefault(era.start, []).append(f"era {e} (a fork changed the mix)")
        for era in self.eras:
            for first, _ in era.stages:
                if first > 0:
                    out.setdefault(first, []).append("stage")
        for index, source in self.exhausted:
            out.setdefault(index, []).append(f"{self.names[source]} reached its max_epochs")
        return out

    # ---------------------------------------------------------------- search
    def _first_exhaustion(self, segments: list) -> tuple[int, int] | None:
        """The earliest (batch, source) at which drawing the batch would take a source past its
        era's max_epochs, among sources still drawn there."""
        best: tuple[int, int] | None = None
        for e, era in enumerate(self.eras):
            lo = era.start
            hi = self.eras[e + 1].start if e + 1 < len(self.eras) else FAR
            for j in range(self.S):
                if not era.max_epochs[j]:
                    continue
                limit = int(era.max_epochs[j] * self.windows[j])
                if self.counts(hi)[j] <= limit:  # never within this era
                    continue
                a, b = lo, hi - 1  # first i in [a, b] with counts(i + 1) > limit
                while a < b:
                    m = (a + b) // 2
                    if self.counts(m + 1)[j] > limit:
                        b = m
                    else:
                        a = m + 1
                if (a, j) in self.exhausted:
                    continue
                if best is None or a < best[0]:
                    best = (a, j)
        return best
