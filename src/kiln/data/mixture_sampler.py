"""The training batches of a weighted mixture: `batch(i)` depends only on (seed, i, rank, world
size), like `BatchSampler`'s; which source each sequence comes from is `MixtureSchedule`'s
(kiln.data.mixture_order), and each source visits its windows in a Feistel order of its own."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from kiln.data.loader import TokenWindows, rank_share
from kiln.data.mixture_order import MixtureSchedule
from kiln.data.order import FeistelOrder


class MixtureSampler:
    def __init__(
        self,
        sources: list[TokenWindows],
        schedule: MixtureSchedule,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shares: list[int] | None = None,
    ):
        self.local_batch, self.offset = rank_share(global_batch, rank, world_size, shares)
        self.sources, self.schedule = sources, schedule
        self.global_batch, self.seed, self.rank = global_batch, seed, rank
        self.names = schedule.names
        # a seed per source, from its name: adding a source leaves the others' orders as they were
        self.seeds = [seed ^ zlib.crc32(name.encode()) for name in self.names]
        self.first_id = np.concatenate([[0], np.cumsum([len(w) for w in sources])])  # ids for invariants
        self._orders: dict[tuple[int, int], FeistelOrder] = {}
        self.state: dict[str, Any] | None = None  # what checkpoints record of the mix (kiln.train.mixture)

    def _order(self, source: int, epoch: int) -> FeistelOrder:
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.sources):  # a batch spans at most two epochs a source
                self._orders.clear()
            self._orders[key] = FeistelOrder(len(self.sources[source]), self.seeds[source], epoch)
        return self._orders[key]

    def _locate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window within it) of this rank's sequences of data batch `index`."""
        first = index * self.global_batch + self.offset
        source, k = self.schedule.route(np.arange(first, first + self.local_batch, dtype=np.int64))
        window = np.empty_like(k)
        for j in np.unique(source):
            sel = source == j
            epochs, within = np.divmod(k[sel], len(self.sources[j]))
            out = np.empty_like(within)
            for e in np.unique(epochs):
                at = epochs == e
                out[at] = self._order(int(j), int(e))[within[at]]
            window[sel] = out
        return source, window

    def sample_indices(self, index: int) -> np.ndarray:
        """Ids of this rank's windows for batch `index`, unique over all sources' windows."""
        source, window = self._locate(index)
        return self.first_id[source] + window

    def batch(self, index: int) -> torch.Tensor:
        """This rank's windows for data batch `index`: int64 tensor (local_batch, seq_len + 1)."""
        source, window = self._locate(index)
        out = np.empty((self.local_batch, self.sources[0].window), dtype=np.int64)
        for j in np.unique(source):
            sel = source == j
            out[sel] = self.sources[j].get(window[sel])
        return torch.from_numpy(out)

    def tokens_by_source(self, index: int, seq_len: int) -> dict[str, int]:
        """Tokens each source has contributed in data batches [0, index) (all ranks together)."""
        counts = self.schedule.counts(index)
        return {name: int(c) * seq_len for name, c in zip(self.names, counts)}
