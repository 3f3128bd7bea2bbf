"""Seeds of the global torch generator, which dropout draws from (weights and masks have
generators of their own)."""

from __future__ import annotations

import hashlib


def dropout_seed(seed: int, dp_rank: int) -> int:
    """The seed of the global torch generator (dropout) on data-parallel rank `dp_rank`: rank 0
    keeps `seed` (so one process draws what it always drew); the others get their own stream, so
    data-parallel ranks never share dropout masks. Ranks of one tensor- or pipeline-parallel group
    share a data-parallel rank and so a seed."""
    if dp_rank == 0:
        return seed
    digest = hashlib.sha256(f"dropout:{seed}:{dp_rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
