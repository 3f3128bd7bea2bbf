"""`kiln export --quantize int8 | int4` and `kiln eval --weights`: the blocks' linears quantised
(torchao), the file loads without unpickling, and the evaluation reports the perplexity change
against the checkpoint it came from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.errors import CheckpointError, KilnError
from kiln.eval.runner import evaluate_run
from kiln.runs.quantize import export_quantized, read_quantized
from kiln.train.session import start_run

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    from kiln.config import load_config

    root = tmp_path_factory.mktemp("quant")
    cfg = load_config(
        preset="tiny",
        overrides=tiny_overrides(
            write_corpus(root / "corpus"), root / "cache", "train.steps=30", "model.tie_embeddings=false"
        ),
    )
    start_run(cfg, root / "runs", "q")
    return root / "runs" / "q"


@pytest.mark.parametrize("scheme, most_change", [("int8", 0.01), ("int4", 0.10)])
def test_export_and_evaluate_quantized(run, tmp_path, scheme, most_change):
    out, sizes = export_quantized(run, tmp_path / f"m-{scheme}.safetensors", None, scheme)
    assert sizes["layers"] == 2 * 7  # wq wk wv wo w1 w2 w3 in each of the two blocks
    assert sizes["weight_bytes"] < 0.6 * sizes["full_weight_bytes"]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["kiln.quantize"] == scheme and meta["kiln.step"] == "30" and meta["kiln.run"] == "q"
    state, _ = read_quantized(out)
    assert type(state["layers.0.attn.wq.weight"]).__module__.startswith("torchao.")
    assert type(state["head.weight"]).__name__ == "Tensor"  # the output head keeps its precision

    report, path = evaluate_run(run, names=["lm"], weights=out)
    assert path.name == f"step-30-{scheme}.json"
    q = report["suites"]["quantized"]
    assert report["suites"]["lm"]["loss"] == q["loss"]  # the suites ran on the quantised model ...
    assert q["loss"] != q["base_loss"]  # ... which differs from the checkpoint ...
    assert abs(q["ppl_change"]) < most_change  # ... by little
    assert q["weight_bytes"] < q["base_weight_bytes"]
    assert json.loads(path.read_text())["suites"]["quantized"]["ppl_change"] == q["ppl_change"]


def test_eval_refuses_weights_that_are_not_a_quantised_export(run, tmp_path):
    import torch

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="is not a quantised export"):
        evaluate_run(run, names=["lm"], weights=plain)


def test_eval_refuses_weights_of_another_run_or_step(run, tmp_path):
    import shutil

    out, _ = export_quantized(run, tmp_path / "m.safetensors", None, "int8")
    other = shutil.copytree(run, tmp_path / "other")
    with pytest.raises(KilnError, match="was exported from run 'q', not other"):
        evaluate_run(other, names=["lm"], weights=out)
    with pytest.raises(KilnError, match="holds step 30, not --step 10"):
        evaluate_run(run, step=10, names=["lm"], weights=out)


def test_cli_refusals_are_one_line(run, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln",
            "export",
            str(run),
            "--quantize",
            "int8",
            "--format",
            "hf",
            "--out",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "kiln export --quantize writes one safetensors file" in r.stderr
    assert not (tmp_path / "hf").exists()
