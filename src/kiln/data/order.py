"""The order an epoch visits the training windows in, in O(1) memory.

A keyed bijection of [0, n): a balanced Feistel network over the smallest domain of 2^(2h) >= n
values (4 rounds of a 64-bit mixing function keyed by (seed, epoch)), cycle-walked until the
result falls in [0, n): applying the network again to an index that lands outside always
reaches one inside (the network permutes the larger domain, whose cycles through [0, n) are
what remain), on average after at most 4 steps. Each index maps on its own, so a step's windows
cost the same at 10^3 windows as at 10^12, and no rank holds an order array (a permutation of
244M windows is 2 GB per rank).

`ORDER_VERSION` is recorded in every checkpoint's trainer state; a run whose checkpoints lack it
was made with the former order (`numpy` permutations per epoch) and resumes with that
(`legacy_order`), never silently reordered.
"""

from __future__ import annotations

import numpy as np

ORDER_VERSION = "feistel-1"
ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit (uint64, wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class FeistelOrder:
    """`order[i]` for i in [0, n) is a permutation of [0, n), fixed by (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"an order needs at least one element, got {n}")
        self.n = n
        self.half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        keys = np.random.default_rng([seed, epoch, 0xFE15]).integers(0, 2**63, size=ROUNDS, dtype=np.uint64)
        self.keys = [np.uint64(k) for k in keys]

    def _network(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << shift) | right

    def __getitem__(self, index: np.ndarray | int) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64)
        if np.any(x >= np.uint64(self.n)):
            raise IndexError(f"index out of range for an order of {self.n}")
        out = self._network(x)
        outside = out >= np.uint64(self.n)
        while np.any(outside):  # cycle-walk: the domain is at most 4n, so this ends fast
            out[outside] = self._network(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


def legacy_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of runs made before `ORDER_VERSION`: a numpy permutation per epoch (O(n) memory)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
