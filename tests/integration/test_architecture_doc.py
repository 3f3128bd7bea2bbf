"""docs/architecture.md's examples work as written: its Python blocks, saved as one plugin file,
train a run of the example family with the example callback and suite on."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from kiln import plugins
from kiln.cli import main

DOC = Path(__file__).parents[2] / "docs" / "architecture.md"


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture
def doc_plugin(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3, "the callback, family and suite examples"
    path = tmp_path / "doc_examples.py"
    path.write_text("\n\n".join(blocks))
    yield path
    # what the examples registered goes with them (later tests in this worker run every suite)
    from kiln.eval.suites import SUITES
    from kiln.model.registry import MODEL_SPECS
    from kiln.train.callbacks.registry import CALLBACKS

    plugins._loaded.pop(str(path), None)
    for name, module in list(sys.modules.items()):
        if name.startswith("kiln_plugin_") and getattr(module, "__file__", None) == str(path.resolve()):
            del sys.modules[name]
    SUITES.pop("weight_norm", None)
    MODEL_SPECS.pop("bigram", None)
    CALLBACKS.pop("norm_brake", None)


def test_the_architecture_doc_examples_train(doc_plugin, tmp_path, shared_corpus):
    sets = tiny_overrides(
        shared_corpus,
        tmp_path / "cache",
        "model.family=bigram",
        "train.steps=6",
        "eval.every=3",
        'callbacks.enabled=["norm_brake"]',
        'eval.suites=["weight_norm"]',
        'callbacks.disabled=["samples"]',
    )
    argv = ["train", "--preset", "tiny", "--plugin", str(doc_plugin), "--runs-dir", str(tmp_path / "runs")]
    assert main([*argv, "--name", "doc", *(a for s in sets for a in ("--set", s))]) == 0
    run = tmp_path / "runs" / "doc"
    records = jsonl(run / "metrics.jsonl")
    assert len(records) == 6 and all(r["norm_brake/mean"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # the bigram family learns
    evals = jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [3, 6] and all(e["weight_norm/rms"] > 0 for e in evals)
