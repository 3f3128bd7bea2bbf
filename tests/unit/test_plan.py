"""`kiln plan`: cluster files, the layout space, the memory model against PyTorch's memory
tracker, the search and its command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.plan.cluster import BUILTIN, load_cluster, parse_cluster
from kiln.plan.layout import Layout
from kiln.plan.search import explain, layouts, search

ROOT = Path(__file__).resolve().parents[2]

MIXED = """
[[group]]
device = "h100"
per_node = 8
nodes = 2

[[group]]
device = "my-gpu"
per_node = 4
memory_gb = 48
peak_tflops = 200
intra_gbps = 64
inter_gbps = 12.5
"""


def test_cluster_files():
    cluster = parse_cluster(MIXED, "mixed.toml")
    assert cluster.world_size == 20 and cluster.mixed
    assert cluster.groups[0].kind == BUILTIN["h100"] and cluster.groups[1].kind.memory_gb == 48
    assert load_cluster("a100:16").world_size == 16 and not load_cluster("a100:16").mixed
    assert load_cluster("local:2").local and load_cluster("local:2").world_size == 2


@pytest.mark.parametrize("text, message", [
    ("[[group]]\ndevice = 'h100'\ngpus = 8\n", "unknown key 'gpus'"),
    ("[[group]]\ndevice = 'h100'\nper_node = 0\n", "per_node must be a positive integer"),
    ("[[group]]\ndevice = 'tpu'\n", "device 'tpu' is not built in .* give memory_gb, peak_tflops"),
    ("[[group]]\ndevice = 'h100'\nmemory_gb = -1\n", "memory_gb must be a positive number"),
    ("title = 'x'\n", "no \\[\\[group\\]\\] tables"),
    ("[[group\n", "not valid TOML"),
])
def test_cluster_refusals(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_cluster(text, "c.toml")


def test_cluster_spec_refusals(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="do not fill nodes of 8"):
        load_cluster("h100:12")


@pytest.mark.parametrize("layout", [Layout(1, 4, 2, 1, 2, 2, "full"),
                                    Layout(2, 1, 1, 2, 1, 4, "none", "interleaved-1f1b", 2)])
def test_a_layout_sets_a_valid_config(layout):
    cfg = load_config("gpt2-124m", overrides=layout.sets())
    assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.tp, cfg.parallel.pp) == \
           (layout.dp_replicate, layout.dp_shard, layout.tp, layout.pp)


def test_the_space_respects_the_model_and_batch():
    space = list(layouts(16, 64, n_layers=8, n_heads=4, n_kv_heads=4))
    assert space and all(x.world == 16 and x.tp in (1, 2, 4) and x.pp <= 8 for x in space)
    assert all(x.micro_batch * x.accum * x.dp == 64 for x in space)
    assert all(x.accum >= x.pp for x in space)
    assert len(space) == len(set(space))


def test_search_ranks_fitting_plans_and_explains():
    cfg = load_config("llama-1b")
    result = search(cfg, cfg.data.vocab_size, load_cluster("h100:16"))
    speeds = [c.tokens_per_s for c in result.plans]
    assert speeds == sorted(speeds, reverse=True) and len(result.plans) > 100
    assert all(c.memory.total <= 80e9 * 0.92 for c in result.plans)
    lines = explain(result)
    assert lines[0].startswith("best: ") and any("held back by" in line for line in lines)
    one_small = "[[group]]\ndevice = 'small'\nmemory_gb = 8\npeak_tflops = 50\nintra_gbps = 10\ninter_gbps = 10\n"
    small = search(cfg, cfg.data.vocab_size, parse_cluster(one_small, "one"))
    assert not small.plans and "does not fit" in small.rejected["single device"]


def test_memory_model_matches_the_tracker():
    """Predicted peaks against FSDPMemTracker / MemTracker on fake tensors (bench/plan_memory.py
    runs 32 layouts; these are the fast ones)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_memory.py"), "--tiny"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("tiny")]
    assert len(rows) >= 2
    for line in rows:
        error = float(line.split()[-2].rstrip("%"))
        assert abs(error) <= 5.0, line


def test_cli(tmp_path):
    out = tmp_path / "plans.json"
    r = subprocess.run([sys.executable, "-m", "kiln", "plan", "--preset", "gpt2-124m", "--cluster", "a100:8",
                        "--top", "3", "--explain", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plans = json.loads(out.read_text())["plans"]
    assert len(plans) == 3 and plans[0]["tokens_per_s"] >= plans[1]["tokens_per_s"]
    assert any(s.startswith("parallel.dp_shard=") for s in plans[0]["set"]) and plans[0]["memory_gb"] < 80
    assert "--set parallel." in r.stdout and "best: " in r.stdout
    bad = subprocess.run([sys.executable, "-m", "kiln", "plan", "--preset", "tiny", "--cluster", "tpu:8"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no such file" in bad.stderr


def test_local_cluster_needs_a_profile_then_plans(tmp_path, monkeypatch):
    """`--cluster local:N` plans from this machine's measurements (kiln plan profile), refused
    in one line without them."""
    from kiln.plan.profile import ComputeFit, LinkFit, _fit_line, profile_key

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    cfg = load_config("tiny", overrides=["train.precision=fp32", "model.tie_embeddings=false"])
    with pytest.raises(ConfigError, match="run kiln plan profile"):
        search(cfg, cfg.data.vocab_size, load_cluster("local:2"), "fp32")
    assert _fit_line([1, 2, 4], [3.0, 5.0, 9.0]) == pytest.approx((1.0, 2.0))
    import os
    threads = max(1, (os.cpu_count() or 1) // 2)
    (tmp_path / "plan-profile.json").write_text(json.dumps({
        "compute": {profile_key(cfg, threads): ComputeFit(0.01, 0.02, 1e-9).__dict__},
        "link": LinkFit(5e-4, 0.5, 0.01, 0.04).__dict__}))
    result = search(cfg, cfg.data.vocab_size, load_cluster("local:2"), "fp32")
    best = result.plans[0]
    assert best.layout.tp == 1  # tensor parallelism's measured overhead makes it lose here
    assert all(c.time.total > 0 for c in result.plans)
