"""Helpers for the reliability tests: a small corpus and a tiny, fast config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.config import Config, load_config


def write_corpus(folder: Path, docs: int = 30) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = "red green blue cyan magenta yellow black white orange purple brown grey".split()
    for i in range(docs):
        lines = [" ".join(words[(i * 5 + j * k) % len(words)] for k in range(1, 10)) for j in range(50)]
        (folder / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_overrides(root: Path, corpus: Path) -> list[str]:
    return [
        f"data.corpus={corpus}",
        f"data.cache_dir={root / 'cache'}",
        "data.vocab_size=300",
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "model.seq_len=16",
        "train.batch_size=4",
        "train.steps=30",
        "train.time_budget_s=0",
        "train.precision=fp32",
        "log.every=1",
        "eval.every=0",
        "eval.batches=1",
        "checkpoint.every=5",
        "checkpoint.keep=0",
        "eval.sample_tokens=2",
        "log.plot=false",
        "schedule.warmup_steps=2",
        "model.dropout=0.1",
        "guard.hang_min_s=0",
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """(config builder, runs dir): `make(*extra_overrides) -> Config`."""
    monkeypatch.setenv("KILN_QUIET", "1")
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    corpus = write_corpus(tmp_path / "corpus")
    base = tiny_overrides(tmp_path, corpus)

    def make(*extra: str) -> Config:
        return load_config("tiny", overrides=base + list(extra))

    return make, tmp_path / "runs"
