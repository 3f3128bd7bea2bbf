"""The `memorisation` suite: how much generated text is copied verbatim from the training data.

Prompts are prefixes taken at random places in the training shards; the model continues each
greedily for `span_tokens` tokens, and a continuation counts as memorised when that exact token
span occurs anywhere in the training shards (after Carlini et al., 2021 and 2023). Reported:
`memorised_share`; `extracted_share`, the share that reproduces the true continuation of its
prefix; and `val_overlap_share`, the share of held-out spans of the same length found in the
training data, the level a model reaches by reproducing duplicated text.

The lookup uses an n-gram index of the training tokens (`NgramIndex`): exact, and sized to
stay in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from kiln.eval.common import generate_batched
from kiln.eval.suites import EvalContext, SuiteResult, register_suite

_MULT = np.uint64(0x100000001B3)  # FNV-64 prime: a polynomial rolling hash modulo 2**64
_MASK = (1 << 64) - 1


class NgramIndex:
    """Answers "does this n-token span occur in these shards?" exactly.

    It stores a hash of the k-gram (k = n - stride + 1) starting at every `stride`-th position.
    Any occurrence of an n-token span contains one of those k-grams at an offset below `stride`,
    so a query hashes its `stride` k-grams, looks each up (binary search), and confirms candidate
    positions against the tokens themselves; hash collisions cannot cause false answers. A
    stride above 1 cuts memory (16 bytes per entry) and build time by that factor. Only when even
    the largest stride would pass `max_entries` is a prefix of the data indexed, and `coverage`
    says how much.
    Spans crossing the boundary between two shard files are not found.
    """

    def __init__(self, shards: Sequence[np.ndarray], n: int, stride: int = 0, max_entries: int = 50_000_000):
        if n < 1:
            raise ValueError("n must be positive")
        self.n = n
        self.shards = [np.asarray(s) for s in shards]
        total = sum(len(s) for s in self.shards)
        if stride <= 0:  # a quarter of the span by default; more when the index would not fit
            stride = min(max(1, n // 2), max(max(1, n // 4), math.ceil(total / max_entries)))
        self.stride = min(stride, n)
        self.k = n - self.stride + 1
        self.bases = np.cumsum([0] + [len(s) for s in self.shards])
        hashes, positions, covered = [], [], 0
        budget = max_entries
        for base, shard in zip(self.bases, self.shards):
            m = min(budget, max(0, (len(shard) - self.k) // self.stride + 1))  # k-grams indexed in this shard
            if m <= 0:
                continue
            budget -= m
            span = (m - 1) * self.stride + self.k
            covered += len(shard) if m == (len(shard) - self.k) // self.stride + 1 else span
            tokens = np.asarray(shard[:span], dtype=np.uint64) + np.uint64(1)
            h = np.zeros(m, dtype=np.uint64)
            for j in range(self.k):  # h = sum tokens[start + j] * MULT**(k - 1 - j), modulo 2**64
                h *= _MULT
                h += tokens[j : j + (m - 1) * self.stride + 1 : self.stride]
            hashes.append(h)
            positions.append(np.arange(m, dtype=np.int64) * self.stride + base)
            if budget <= 0:
                break
        self.coverage = covered / total if total else 0.0
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        order = np.argsort(h, kind="stable")
        self.hashes, self.positions = h[order], pos[order]

    def _hash(self, tokens: Iterable[int]) -> int:
        h = 0
        for t in tokens:
            h = (h * int(_MULT) + int(t) + 1) & _MASK
        return h

    def __contains__(self, span: Sequence[int] | np.ndarray) -> bool:
        tokens = np.asarray(span, dtype=np.int64)
        if len(tokens) != self.n:
            raise ValueError(f"the index answers spans of exactly {self.n} tokens, got {len(tokens)}")
        for o in range(self.stride):
            h = np.uint64(self._hash(tokens[o : o + self.k]))
            lo = np.searchsorted(self.hashes, h, "left")
            hi = np.searchsorted(self.hashes, h, "right")
            for g in self.positions[lo:hi].tolist():
                s = int(np.searchsorted(self.bases, g, "right")) - 1
                start = g - int(self.bases[s]) - o
                shard = self.shards[s]
                if (
                    start >= 0
                    and start + self.n <= len(shard)
                    and np.array_equal(shard[start : start + self.n], tokens)
                ):
                    return True
        return False


_cache: dict[tuple, NgramIndex] = {}


def training_index(data, n: int) -> NgramIndex:
    """The index of a prepared dataset's training split (kept for the next evaluation)."""
    key = (str(data.path), n)
    if key not in _cache:
        _cache.clear()
        _cache[key] = NgramIndex(data.split("train"), n)
    return _cache[key]


def random_spans(shards: list[np.ndarray], length: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` windows of `length` tokens at random places (shards weighted by size)."""
    usable = [s for s in shards if len(s) >= length]
    if not usable:
        return []
    sizes = np.array([len(s) - length + 1 for s in usable], dtype=np.float64)
    out = []
    for i in rng.choice(len(usable), size=count, p=sizes / sizes.sum()):
        start = int(rng.integers(0, len(usable[i]) - length + 1))
        out.append(np.asarray(usable[i][start : start + length], dtype=np.int64))
    return out


def memorised_share(spans: Sequence[Sequence[int] | np.ndarray], index: NgramIndex) -> float:
    return sum(span in index for span in spans) / len(spans) if len(spans) else float("nan")


@register_suite("memorisation", generates=True, options={"samples": 64, "prefix_tokens": 32, "span_tokens": 32})
def memorisation_suite(ctx: EvalContext) -> SuiteResult:
    """Share of greedy continuations of training prefixes that occur verbatim in the training shards."""
    o = ctx.options
    P, S = max(1, o["prefix_tokens"]), max(1, o["span_tokens"])
    rng = np.random.default_rng(ctx.seed)
    windows = random_spans(ctx.data.split("train"), P + S, max(1, o["samples"]), rng)
    if not windows:
        return SuiteResult(skipped=f"the training shards are shorter than prefix_tokens + span_tokens = {P + S}")
    prefixes = torch.from_numpy(np.stack([w[:P] for w in windows]))
    truths = [w[P:] for w in windows]
    generated = generate_batched(ctx, prefixes, S, temperature=0.0).numpy()
    index = training_index(ctx.data, S)
    hits = [g in index for g in generated]
    extracted = [bool(np.array_equal(g, t)) for g, t in zip(generated, truths)]
    val_spans = random_spans(ctx.data.split("val"), S, len(windows), rng)
    tok = ctx.tokenizer
    examples = [
        {"prefix": tok.decode(w[:P].tolist()), "generated": tok.decode(g.tolist())}
        for w, g, hit in zip(windows, generated, hits)
        if hit
    ][:20]
    metrics = {
        "memorised_share": float(np.mean(hits)),
        "extracted_share": float(np.mean(extracted)),
        "val_overlap_share": memorised_share(val_spans, index),
        "spans": len(windows),
        "span_tokens": S,
        "index_coverage": index.coverage,
    }
    return SuiteResult(metrics, {"memorised_examples": examples})
