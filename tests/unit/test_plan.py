"""`kiln plan`: cluster files, the layout space, the memory model against PyTorch's memory
tracker, the search and its command line."""

from __future__ import annotations

import dataclasses
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


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[group]]\ndevice = 'h100'\ngpus = 8\n", "unknown key 'gpus'"),
        ("[[group]]\ndevice = 'h100'\nper_node = 0\n", "per_node must be a positive integer"),
        ("[[group]]\ndevice = 'tpu'\n", "device 'tpu' is not built in .* give memory_gb, peak_tflops"),
        ("[[group]]\ndevice = 'h100'\nmemory_gb = -1\n", "memory_gb must be a positive number"),
        ("title = 'x'\n", "no \\[\\[group\\]\\] tables"),
        ("[[group\n", "not valid TOML"),
    ],
)
def test_cluster_refusals(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_cluster(text, "c.toml")


def test_cluster_spec_refusals(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="do not fill nodes of 8"):
        load_cluster("h100:12")


@pytest.mark.parametrize(
    "layout", [Layout(1, 4, 2, 1, 2, 2, "full"), Layout(2, 1, 1, 2, 1, 4, "none", "interleaved-1f1b", 2)]
)
def test_a_layout_sets_a_valid_config(layout):
    cfg = load_config("gpt2-124m", overrides=layout.sets())
    assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.tp, cfg.parallel.pp) == (
        layout.dp_replicate,
        layout.dp_shard,
        layout.tp,
        layout.pp,
    )


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
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plan_memory.py"), "--tiny"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("tiny")]
    assert len(rows) >= 2
    for line in rows:
        error = float(line.split()[-2].rstrip("%"))
        assert abs(error) <= 5.0, line


def test_cli(tmp_path):
    out = tmp_path / "plans.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln",
            "plan",
            "--preset",
            "gpt2-124m",
            "--cluster",
            "a100:8",
            "--top",
            "3",
            "--explain",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    plans = json.loads(out.read_text())["plans"]
    assert len(plans) == 3 and plans[0]["tokens_per_s"] >= plans[1]["tokens_per_s"]
    assert any(s.startswith("parallel.dp_shard=") for s in plans[0]["set"]) and plans[0]["memory_gb"] < 80
    assert "--set parallel." in r.stdout and "best: " in r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "kiln", "plan", "--preset", "tiny", "--cluster", "tpu:8"], capture_output=True, text=True
    )
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
    (tmp_path / "plan-profile.json").write_text(
        json.dumps(
            {
                "compute": {profile_key(cfg, threads): ComputeFit(0.01, 0.02, 1e-9).__dict__},
                "link": LinkFit(5e-4, 0.5, 0.01, 0.04).__dict__,
            }
        )
    )
    result = search(cfg, cfg.data.vocab_size, load_cluster("local:2"), "fp32")
    best = result.plans[0]
    assert best.layout.tp == 1  # tensor parallelism's measured overhead makes it lose here
    assert all(c.time.total > 0 for c in result.plans)


def test_measured_compute_is_interpolated_between_micro_batches():
    """A CPU's time per sequence depends on the micro-batch (cache): the profile keeps what it
    measured and the model reads between the points, extending with the nearest slope."""
    from kiln.plan.profile import ComputeFit, micro_batch_sizes

    fit = ComputeFit(0.0, 0.015, 1e-9, measured=((1, 0.02), (2, 0.03), (4, 0.05), (8, 0.13)))
    assert fit.forward_backward_s(2) == pytest.approx(0.03)
    assert fit.forward_backward_s(3) == pytest.approx(0.04)
    assert fit.forward_backward_s(6) == pytest.approx(0.09)
    assert fit.forward_backward_s(16) == pytest.approx(0.13 + 8 * 0.02)  # the last slope, 20 ms per sequence
    flat = ComputeFit(0.0, 0.015, 1e-9, measured=((1, 0.02), (2, 0.03), (4, 0.05), (8, 0.05)))  # noise
    assert flat.forward_backward_s(16) == pytest.approx(0.05 + 8 * 0.015)  # never cheaper than the line past it
    assert ComputeFit(0.01, 0.02, 1e-9).forward_backward_s(4) == pytest.approx(0.09)  # no table: the line
    assert micro_batch_sizes(16) == (1, 2, 4, 8, 16)
    assert micro_batch_sizes(12) == (1, 2, 4, 8, 12)
    assert micro_batch_sizes(1) == (1, 2)


def test_pipeline_time_charges_the_head_to_the_last_stage():
    """With a 4096-token vocabulary the tiny model's head is about half its FLOPs: a two-stage
    pipeline waits for the stage that holds it, not for half the model."""
    from kiln.model.registry import get_spec
    from kiln.model.spec import padded_vocab
    from kiln.plan.peak_memory import model_facts
    from kiln.plan.profile import ComputeFit, LinkFit
    from kiln.plan.timing import busiest_stage_share, local_step_time

    cfg = load_config("tiny", overrides=["train.precision=fp32", "model.tie_embeddings=false"])
    f = model_facts(cfg, cfg.data.vocab_size, "fp32")
    m, vocab = cfg.model, padded_vocab(cfg.data.vocab_size)
    head = 6 * vocab * m.d_model  # training FLOPs per token of the output projection
    assert f.edge_flops_share == pytest.approx(head / get_spec(m.family).flops(m, vocab), rel=0.05)
    pipeline = Layout(1, 1, 1, 2, 4, 4, "none", "1f1b")
    assert busiest_stage_share(f, Layout(1, 1, 1, 1, 4, 4)) == 1.0
    assert busiest_stage_share(f, pipeline) == pytest.approx((1 - f.edge_flops_share) / 2 + f.edge_flops_share)
    fit, link = ComputeFit(0.0, 0.02, 0.0), LinkFit(0.0, 1e3)
    one = local_step_time(f, Layout(1, 1, 1, 1, 4, 4), cfg.global_batch, fit, link, cores=2).compute
    two = local_step_time(f, pipeline, cfg.global_batch, fit, link, cores=2)
    assert two.compute == pytest.approx(one * busiest_stage_share(f, pipeline), rel=1e-6)
    assert two.bubble == pytest.approx(two.compute / 4, rel=1e-6)  # (pp - 1) / micro-batches of it


def test_search_tries_lighter_last_stages():
    """Pipelines also get layer splits that unload the stage holding the head; with the tiny
    model's heavy head (about half its FLOPs) on 4 layers, 3 + 1 beats 2 + 2, and the plan says
    how to run it."""
    from kiln.plan.peak_memory import model_facts
    from kiln.plan.search import stage_splits
    from kiln.plan.timing import busiest_stage_share, step_time

    assert stage_splits(16, 2) == [(), (9, 7), (10, 6), (11, 5), (12, 4), (13, 3), (14, 2), (15, 1)]
    three = stage_splits(16, 3)  # no even split: all explicit; first and last never heavier than the middle
    assert () not in three and {(5, 6, 5), (6, 6, 4), (1, 14, 1)} <= set(three)
    assert all(sum(c) == 16 and max(c[0], c[2]) <= c[1] for c in three) and len(set(three)) == len(three)
    assert stage_splits(12, 4)[0] == () and (3, 4, 4, 1) in stage_splits(12, 4)
    assert stage_splits(2, 2) == [()] and stage_splits(8, 1) == [()]
    cfg = load_config("tiny", overrides=["model.n_layers=4", "model.tie_embeddings=false"])
    f = model_facts(cfg, cfg.data.vocab_size, "bf16")
    even, light = (Layout(1, 1, 1, 2, 2, 8, "none", "1f1b", stage_layers=s) for s in ((), (3, 1)))
    assert even.layers_per_stage(4) == [2, 2] and light.layers_per_stage(4) == [3, 1]
    assert busiest_stage_share(f, light) < busiest_stage_share(f, even)
    h100 = BUILTIN["h100"]
    assert step_time(f, light, 16, h100, 8).compute < step_time(f, even, 16, h100, 8).compute
    assert "parallel.pp_layers=[3,1]" in light.sets() and "layers 3/1" in light.describe()
    assert "parallel.pp_layers=[]" in even.sets()  # overrides a pp_layers the user's config may hold
    cfg_even = load_config("tiny", overrides=["model.n_layers=4", "parallel.pp_layers=[3,1]", *even.sets()])
    assert cfg_even.parallel.pp_layers == [] and cfg_even.parallel.pp == 2
    found = {lay.stage_layers for lay in layouts(2, 16, 4, 4, 4) if lay.pp == 2 and lay.schedule != "interleaved-1f1b"}
    assert found == {(), (3, 1)}


def test_profile_tables_round_trip(tmp_path, monkeypatch):
    """A profile's measured micro-batch table survives the JSON cache (lists back to tuples)."""
    from kiln.plan.profile import ComputeFit, LinkFit, load_profile, profile_key

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    cfg = load_config("tiny", overrides=["train.precision=fp32", "model.tie_embeddings=false"])
    measured = ComputeFit(0.0, 0.02, 1e-9, measured=((1, 0.02), (2, 0.04)))
    link = LinkFit(5e-4, 0.5, 0.01, 0.02, 0.003)
    (tmp_path / "plan-profile.json").write_text(
        json.dumps({"compute": {profile_key(cfg, 1): measured.__dict__}, "link": link.__dict__})
    )
    assert load_profile(cfg, 1) == (measured, link)
    assert load_profile(cfg, 2) is None  # another thread count: not measured


def test_the_space_of_a_large_job_exceeds_a_hundred_thousand_layouts():
    """A Llama-2-70B shape (80 layers, 64 heads, 8 KV heads) at 2,048 sequences a step on 1,024
    devices: degrees x micro-batches x checkpointing x schedules x stage splits. (Scoring them all
    takes ~10 s here: bench/plan_search.py.)"""
    assert sum(1 for _ in layouts(1024, 2048, 80, 64, 8)) >= 100_000


def test_profile_measures_this_machine(tmp_path, monkeypatch):
    """`kiln plan profile` on a very small model: the micro-batch table, the link fit and the
    parallel overheads land in KILN_HOME, and the search then plans from them."""
    import os

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    env = dict(os.environ)
    overrides = [
        "model.n_layers=1",
        "model.d_model=32",
        "model.n_heads=2",
        "model.seq_len=32",
        "train.batch_size=4",
        "train.precision=fp32",
    ]
    sets = [a for s in overrides for a in ("--set", s)]
    r = subprocess.run(
        [sys.executable, "-m", "kiln", "plan", "profile", "--preset", "tiny", *sets, "--cluster", "local:2"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "plan-profile.json").read_text())
    (entry,) = data["compute"].values()
    assert [m for m, _ in entry["measured"]] == [1, 2, 4] and all(t > 0 for _, t in entry["measured"])
    assert data["link"]["gbps"] > 0 and data["link"]["fsdp_unit_s"] >= 0
    cfg = load_config("tiny", overrides=overrides)
    result = search(cfg, cfg.data.vocab_size, load_cluster("local:2"), "fp32")
    assert result.plans and all(c.tokens_per_s > 0 for c in result.plans)


def test_the_plan_weighs_reducing_gradients_once_a_step():
    """Under accumulation with FSDP the space holds both `parallel.grad_sync` settings: reducing
    once a step costs fewer reduce-scatters but keeps whole gradients until then; HSDP's replicas
    all-reduce once a step either way. The plan's --set lines carry the setting."""
    from kiln.plan.peak_memory import model_facts, peak_memory
    from kiln.plan.timing import step_time

    cfg = load_config("llama-1b")
    f = model_facts(cfg, cfg.data.vocab_size, "bf16")
    every, last = (Layout(2, 8, 1, 1, 2, 2, grad_sync=mode) for mode in ("every_microbatch", "last_microbatch"))
    h100 = BUILTIN["h100"]
    slow_net = dataclasses.replace(h100, intra_gbps=5, inter_gbps=5)  # communication-bound
    for kind in (h100, slow_net):
        a, b = step_time(f, every, 64, kind, 8), step_time(f, last, 64, kind, 8)
        assert b.fsdp <= a.fsdp and b.dp == a.dp
    assert step_time(f, last, 64, slow_net, 8).fsdp < step_time(f, every, 64, slow_net, 8).fsdp
    assert peak_memory(f, last).total > peak_memory(f, every).total
    space = set(layouts(16, 64, n_layers=16, n_heads=32, n_kv_heads=8))
    assert every in space and last in space
    assert not any(x.grad_sync == "last_microbatch" and (x.accum == 1 or x.dp_shard == 1) for x in space)
    assert "parallel.grad_sync=last_microbatch" in last.sets() and "once a step" in last.describe()
    assert load_config("llama-1b", overrides=last.sets()).parallel.grad_sync == "last_microbatch"
