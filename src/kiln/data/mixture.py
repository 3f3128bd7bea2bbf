"""`[[data.sources]]`: a weighted mixture of corpora, prepared source by source.

Every source shares one tokenizer: `data.tokenizer` when given, else a byte-level BPE trained on
a weighted sample of the sources' training text (source j contributes about
`weight_j / sum(weights)` of `data.tokenizer_sample_mb`, or all it has), cached under
`data.cache_dir/tokenizer-<key>`. Each source is then prepared on its own, exactly as
`data.corpus` would be with that tokenizer (kiln.data.shards): a dataset keyed by its corpus and
the tokenizer's hash. So with a given (or pinned) tokenizer, adding a source prepares only it;
with a trained one, a new source changes the sample, hence the tokenizer, and every source is
prepared again (the log says so).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from kiln.config import DataConfig, SourceConfig
from kiln.data import stream
from kiln.data.corpora import CorpusFile, corpus_fingerprint, resolve_corpus
from kiln.data.shards import (
    FORMAT_VERSION,
    MAX_PIECE_CHARS,
    Prepared,
    corpus_items,
    count_corpus,
    prepare,
    staged,
    writable_cache,
)
from kiln.data.tokenizer import KilnTokenizer, train_tokenizer
from kiln.errors import DataError

T = TypeVar("T")


@dataclass
class SourceData:
    """One prepared source of a mixture."""

    name: str
    weight: float
    max_epochs: float
    prepared: Prepared


@dataclass
class MixturePrepared:
    """The prepared sources of a mixture, behind the interface of one prepared dataset: `split`
    concatenates the sources' shards (for tools that read the data whole); the sampler and the
    evaluation read `sources`. `manifest["val_unigram_entropy"]` is the weight-averaged entropy of
    the sources (the loss of a context-free model that knows which source it reads)."""

    sources: list[SourceData]
    tokenizer: KilnTokenizer
    manifest: dict[str, Any]
    path: Path  # the first source's dataset folder

    def split(self, name: str) -> list[np.ndarray]:
        return [shard for s in self.sources for shard in s.prepared.split(name)]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


def source_config(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    """The single-corpus config that prepares `source`."""
    return replace(cfg, corpus=source.corpus, text_field=source.text_field or cfg.text_field, sources=[], stages=[])


def _in_source(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, its one-line refusals naming the source they concern."""
    try:
        return fn(*args, **kwargs)
    except DataError as e:
        raise DataError(f"data.sources.{name}: {e}") from None


def _source_log(log: Callable[[str], None], name: str, text: str) -> None:
    log(f"source {name}: {text}")


def prepare_mixture(cfg: DataConfig, log: Callable[[str], None] = print) -> MixturePrepared:
    files = {s.name: _in_source(s.name, resolve_corpus, source_config(cfg, s)) for s in cfg.sources}
    counted: dict[str, stream.SplitCounts] = {}  # the tokenizer's counting passes, reused by prepare
    tokenizer_path = Path(cfg.tokenizer) if cfg.tokenizer else _mixture_tokenizer(cfg, files, log, counted)
    sources = []
    for s in cfg.sources:
        scfg = replace(source_config(cfg, s), tokenizer=str(tokenizer_path))
        say = functools.partial(_source_log, log, s.name)
        prepared = _in_source(s.name, prepare, scfg, say, files[s.name], counted.get(s.name))
        sources.append(SourceData(s.name, s.weight, s.max_epochs, prepared))
    tok = sources[0].prepared.tokenizer
    return MixturePrepared(sources, tok, mixture_manifest(sources, tok), sources[0].prepared.path)


def mixture_manifest(sources: list[SourceData], tok: KilnTokenizer) -> dict[str, Any]:
    total = sum(s.weight for s in sources)
    keys = [s.prepared.manifest.get("content_key", s.prepared.manifest["key"]) for s in sources]
    content = hashlib.sha256("\n".join(f"{s.name}:{k}" for s, k in zip(sources, keys)).encode()).hexdigest()[:20]
    splits = {
        split: {
            "tokens": sum(s.prepared.manifest["splits"][split]["tokens"] for s in sources),
            "documents": sum(s.prepared.manifest["splits"][split]["documents"] for s in sources),
        }
        for split in ("train", "val")
    }
    return {
        "mixture": True,
        "key": content,
        "content_key": content,  # the data (sources' names and contents), not the weights: resume checks both
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "dtype": sources[0].prepared.manifest["dtype"],
        "val_unigram_entropy": sum(s.weight * s.prepared.manifest["val_unigram_entropy"] for s in sources) / total,
        "splits": splits,
        "sources": {
            s.name: {
                "path": str(s.prepared.path),
                "content_key": k,
                "weight": s.weight,
                "train_tokens": s.prepared.manifest["splits"]["train"]["tokens"],
                "val_tokens": s.prepared.manifest["splits"]["val"]["tokens"],
                "val_unigram_entropy": s.prepared.manifest["val_unigram_entropy"],
            }
            for s, k in zip(sources, keys)
        },
    }


def _tokenizer_key(cfg: DataConfig, files: dict[str, list[CorpusFile]]) -> str:
    parts = [str(FORMAT_VERSION), str(cfg.vocab_size), repr(cfg.val_fraction), str(cfg.split_seed)]
    parts += [str(cfg.max_docs), str(cfg.piece_chars), str(cfg.tokenizer_sample_mb)]
    for s in cfg.sources:
        parts += [s.name, corpus_fingerprint(files[s.name]), repr(s.weight), s.text_field or cfg.text_field]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _mixture_tokenizer(
    cfg: DataConfig,
    files: dict[str, list[CorpusFile]],
    log: Callable[[str], None],
    counted: dict[str, stream.SplitCounts],
) -> Path:
    """The shared tokenizer trained on a weighted sample of every source's training text (cached);
    each source's counting pass is left in `counted`."""
    final = Path(cfg.cache_dir).expanduser() / f"tokenizer-{_tokenizer_key(cfg, files)}"
    if (final / "manifest.json").is_file():
        return final / "tokenizer.json"
    writable_cache(cfg)
    log(
        "training the mixture's tokenizer on a weighted sample of every source; adding or reweighting a source "
        "trains a new one and prepares every source again (set data.tokenizer to a tokenizer.json to pin it)"
    )
    budget = cfg.tokenizer_sample_mb * 2**20
    total = sum(s.weight for s in cfg.sources)
    passes: list[Iterator[str]] = []
    shares: dict[str, float] = {}
    for s in cfg.sources:
        scfg = source_config(cfg, s)
        items = corpus_items(scfg, files[s.name])
        counts = counted[s.name] = _in_source(s.name, count_corpus, scfg, items, log)
        own_split = counts.train_texts > 0  # a source of a piece or two: its text is all validation
        chars = counts.train_chars if own_split else counts.val_chars
        fraction = min(1.0, budget * s.weight / total / max(1, chars)) if s.weight > 0 else 0.0
        shares[s.name] = fraction
        texts = (t for v, t in items(None, stream.SplitCounts()) if not v or not own_split)
        passes.append(stream.sampled(texts, fraction, cfg.split_seed) if fraction > 0 else iter(()))
    pieces = (t[i : i + MAX_PIECE_CHARS] for t in itertools.chain(*passes) for i in range(0, len(t), MAX_PIECE_CHARS))
    tok = train_tokenizer(pieces, cfg.vocab_size)
    with staged(final) as tmp:
        tok.save(tmp / "tokenizer.json")
        (tmp / "manifest.json").write_text(
            json.dumps({"tokenizer_sha256": tok.sha256, "sample_fraction": shares}, indent=2)
        )
    return final / "tokenizer.json"
