"""Fixtures for the reliability tests."""

from __future__ import annotations

import pytest
from reliability_helpers import tiny_overrides, write_corpus

from kiln.config import Config, load_config


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


