"""The run's prepared data, whichever kind its objective trains on: token shards
(kiln.data.shards), a weighted mixture of them (kiln.data.mixture) or image-text samples
(kiln.data.multimodal.prepare)."""

from __future__ import annotations

from collections.abc import Callable

from kiln.config import Config
from kiln.data.mixture import MixturePrepared, prepare_mixture
from kiln.data.multimodal.prepare import MultimodalPrepared, prepare_multimodal
from kiln.data.shards import Prepared, prepare


def prepare_data(cfg: Config, log: Callable[[str], None] = print) -> Prepared | MixturePrepared | MultimodalPrepared:
    if cfg.train.objective == "multimodal":
        return prepare_multimodal(cfg.data, log=log)
    if cfg.data.sources:
        return prepare_mixture(cfg.data, log=log)
    return prepare(cfg.data, log=log)
