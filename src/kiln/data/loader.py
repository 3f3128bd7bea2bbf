"""Deterministic, resumable, rank-aware batches of packed token windows.

The token stream (documents joined by EOS) is cut into windows of `seq_len + 1` tokens. Each
epoch visits every window once in an order drawn from (seed, epoch). The global batch at step
`s` is the windows with global sample indices `[s*B, (s+1)*B)`, so a batch is a pure function
of (seed, step): resuming needs only the step, and data-parallel rank `r` of `w` takes its
contiguous, disjoint share of each global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.data.order import ORDER_VERSION, FeistelOrder, legacy_order
from kiln.errors import DataError


class TokenWindows:
    """Random access to the fixed-length windows of a list of token shards."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, split: str = "train"):
        self.shards = shards
        self.window = seq_len + 1
        self.seq_len = seq_len
        per_shard = np.array([max(0, (len(s) - 1) // seq_len) for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])
        self.count = int(self.starts[-1])
        if self.count == 0:
            tokens = sum(len(s) for s in shards)
            raise DataError(
                f"the {split} split has {tokens} tokens, fewer than one window of model.seq_len + 1 = "
                f"{self.window}; use a larger corpus, a larger data.val_fraction or a smaller model.seq_len"
            )

    def __len__(self) -> int:
        return self.count

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Windows by index, as an int64 array of shape (len(indices), seq_len + 1)."""
        shard_ids = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.window), dtype=np.int64)
        for row, (shard, idx) in enumerate(zip(shard_ids, indices)):
            offset = int(idx - self.starts[shard]) * self.seq_len
            out[row] = self.shards[shard][offset : offset + self.window]
        return out


def rank_share(global_batch: int, rank: int, world_size: int, shares: list[int] | None = None) -> tuple[int, int]:
    """(sequences of the global batch for data-parallel rank `rank`, index of its first one): an
    even split, or `shares` (`parallel.dp_batch_shares`: devices of different speeds)."""
    if shares:
        if len(shares) != world_size:
            raise DataError(
                f"parallel.dp_batch_shares names {len(shares)} ranks; the run has {world_size} data-parallel ranks"
            )
        return shares[rank], sum(shares[:rank])
    if global_batch % world_size:
        raise DataError(
            f"the global batch of {global_batch} sequences does not split evenly over "
            f"{world_size} data-parallel ranks; make train.batch_size a multiple of {world_size}"
        )
    return global_batch // world_size, rank * (global_batch // world_size)


class BatchSampler:
    """The training batches: `batch(step)` depends only on (seed, step, rank, world size).
    `order`: "feistel-1" (kiln.data.order, O(1) memory) or "legacy" (runs made before it)."""

    def __init__(
        self,
        windows: TokenWindows,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shares: list[int] | None = None,
        order: str = ORDER_VERSION,
    ):
        if order not in (ORDER_VERSION, "legacy"):
            raise DataError(f"unknown window order {order!r}; this Kiln knows {ORDER_VERSION} and legacy")
        self.local_batch, self.offset = rank_share(global_batch, rank, world_size, shares)
        self.windows = windows
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.order = order
        self._epoch = -1
        self._order: FeistelOrder | np.ndarray = np.empty(0, dtype=np.int64)

    def _order_for(self, epoch: int) -> FeistelOrder | np.ndarray:
        if epoch != self._epoch:
            n = len(self.windows)
            self._order = (
                FeistelOrder(n, self.seed, epoch) if self.order == ORDER_VERSION else legacy_order(n, self.seed, epoch)
            )
            self._epoch = epoch
        return self._order

    def sample_indices(self, step: int) -> np.ndarray:
        first = step * self.global_batch + self.offset
        n = len(self.windows)
        positions = np.arange(first, first + self.local_batch, dtype=np.int64)
        epochs, within = np.divmod(positions, n)
        out = np.empty(self.local_batch, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch spans at most two epochs (unless it exceeds one)
            sel = epochs == epoch
            out[sel] = self._order_for(int(epoch))[within[sel]]
        return out

    def batch(self, step: int) -> torch.Tensor:
        """This rank's windows for `step`: int64 tensor (local_batch, seq_len + 1)."""
        return torch.from_numpy(self.windows.get(self.sample_indices(step)))

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / len(self.windows)


def eval_windows(windows: TokenWindows, n: int) -> torch.Tensor:
    """`n` validation windows spread evenly over the split (so every held-out document is
    represented, not just the first few); the same windows for every evaluation."""
    n = min(n, len(windows))
    return torch.from_numpy(windows.get(np.linspace(0, len(windows) - 1, n).round().astype(np.int64)))


@dataclass
class WindowShare:
    """One data-parallel rank's part of a fixed set of evaluation windows."""

    windows: torch.Tensor  # (rows, seq_len + 1): the real windows, then padding to whole batches
    valid: int  # rows before this index are real; the rest are copies that must predict nothing
    first_index: int  # index of row 0 among all the windows (masks are drawn per window index)


def share_windows(windows: torch.Tensor, rank: int, world: int, multiple: int = 1) -> WindowShare:
    """Rank `rank`'s contiguous share of `windows`: ceil(n / world) rows (fewer on the last ranks),
    padded to the same whole number of `multiple`-row batches on every rank, so all ranks run the
    same forwards and, together, evaluate every window exactly once."""
    n = len(windows)
    per = -(-n // world)
    rows = max(1, -(-per // multiple) * multiple)
    start = min(rank * per, n)
    real = windows[start : start + per]
    pad = windows[:1].expand(rows - len(real), *windows.shape[1:]) if rows > len(real) else windows[:0]
    return WindowShare(torch.cat([real, pad]), len(real), start)
