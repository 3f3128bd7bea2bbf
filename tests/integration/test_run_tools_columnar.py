"""The run tools on long runs read metrics by column (kiln.runfolder.columns, through the columnar
copy of kiln.runfolder.column_cache): fabricated run folders of thousands of logged steps, with what
long runs hold (a NaN loss, spikes, slow steps, a rollback's repeated steps, keys that first
appear late, values that are not numbers, a line still being written), give the same doctor
findings, curves, headline numbers and `kiln runs` rows as the record-by-record code they
replaced (run_tools_reference.py), from the cache as from the file."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import run_tools_reference as ref
from PIL import Image

from kiln.config import load_config, to_toml
from kiln.runfolder import column_cache
from kiln.runs import curves
from kiln.runs.catalog import run_row
from kiln.runs.compare import compare_runs, headline
from kiln.runs.doctor import diagnose
from kiln.runs.report import write_report
from kiln.runs.rundir import RunDir

TOKENS = 4096  # per step


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    if step <= warmup:
        return peak * step / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))


def write_run(folder: Path, kind: str, steps: int, seed: int = 0, overrides: tuple[str, ...] = ()) -> RunDir:
    """A finished run of `steps` logged steps whose metrics show `kind` of trouble ("long": a NaN,
    spikes, slow and stalled steps, a slow rank, a rollback, late and odd keys; "diverge", "grads",
    "plateau", "wrecked", "moe": one problem each)."""
    folder.mkdir(parents=True)
    warmup = 200 if kind == "long" else 100
    sets = [f"train.steps={steps}", f"schedule.warmup_steps={warmup}", *overrides]
    if kind == "long":
        sets += ['callbacks.enabled=["layer_stats", "step_time"]', "callbacks.layer_stats.every=10"]
    if kind == "moe":
        sets += ["model.moe_experts=4", "model.moe_top_k=1"]
    cfg = load_config(preset="tiny", overrides=sets)
    (folder / "config.toml").write_text(to_toml(cfg))
    (folder / "run.json").write_text(json.dumps({"name": folder.name, "created": "2026-01-05T10:00:00+0000"}))
    rnd = random.Random(seed)
    peak = cfg.optim.lr
    lines = []
    for s in range(1, steps + 1):
        lr = lr_at(s, steps, warmup, peak)
        loss = 2.5 + 5.0 * math.exp(-s / (steps / 8)) + rnd.gauss(0, 0.02)
        grad = 0.5 + rnd.random() * 0.1
        rate = 16000 + rnd.random() * 400
        r: dict = {"step": s, "tokens": s * TOKENS, "loss": loss, "lr": lr, "grad_norm": grad, "tokens_per_s": rate}
        if kind == "long":
            if s == 5000:
                r["loss"] = math.nan
            if s == 5001:
                r["grad_norm"] = math.inf
            if s in (12000, 12003):
                r["loss"] = loss * 2.5
            if s in (7000, 7001):
                r["tokens_per_s"] = rate / 40  # a slow step
            if s % 10 == 0:
                r["tokens_per_s"] = rate * 0.9  # layer_stats samples these: slower by design
            if s >= 15000:  # the step_time callback switched on late
                r["step_time/data_s"] = 0.002 + rnd.random() * 0.0005 + (1.5 if s == 17000 else 0.0)
                r["step_time/forward_backward_s"] = 0.2 + rnd.random() * 0.01
            if s >= 10000:
                r["step_time/rank0_busy_s"] = 0.2 + rnd.random() * 0.01
                r["step_time/rank1_busy_s"] = 0.32 + rnd.random() * 0.01
            if s <= 200:
                r["phase"] = "warmup"  # a string: never a number
            if s == 300:
                r["note"] = [1, {"a": None}]
            if s == 400:
                r["flag"], r["big"], r["none"] = True, 2**60, None
            if s == 450:
                r["lr"] = None
        elif kind == "diverge":
            if s > steps * 2 // 3:
                r["loss"] = loss + 3.0 * (s - steps * 2 // 3) / (steps / 3) + 1.0
                r["grad_norm"] = grad * 10
            if s > steps - 3:
                r["loss"] = math.nan
        elif kind == "grads":
            r["grad_norm"] = grad * math.exp(4 * s / steps)
        elif kind == "plateau":
            if s > steps // 3:
                r["lr"] = lr * 1e-4
                r["loss"] = 4.0 + rnd.gauss(0, 0.01)
        elif kind == "wrecked":
            r["loss"] = 8.0 + (1.5 * s / warmup if s < warmup else 0.0) - 1.6 * s / steps + rnd.gauss(0, 0.02)
        elif kind == "moe":
            r["moe/layer0/load_max_mean"] = 1.2 + (2.5 if s > steps // 2 else 0.0) + rnd.random() * 0.1
            r["moe/layer1/load_max_mean"] = 1.2 + rnd.random() * 0.1
        lines.append(json.dumps(r))
        if kind == "long" and s == 9010:  # a rollback to 9000: steps 9001-9010 logged again
            for again in range(9001, 9011):
                lines.append(json.dumps({**json.loads(lines[again - 1]), "loss": 2.6 + again * 1e-5}))
    text = "\n".join(lines) + "\n"
    if kind == "long":
        text += '{"step": ' + str(steps + 1) + ', "loss": 2.'  # a line still being written
    (folder / "metrics.jsonl").write_text(text)
    evals, events = [], []
    every = max(1, steps // 40)
    for step in range(every, steps + 1, every):
        val = 2.6 + 5.0 * math.exp(-step / (steps / 8)) + rnd.gauss(0, 0.005)
        if kind == "wrecked":
            val = 6.2
        evals.append(
            {"step": step, "tokens": step * TOKENS, "val_loss": val, "lm/acc": 0.3, "lm/bits_per_byte": val / 2}
        )
    if kind == "long":
        events = [
            {"step": 5000, "kind": "nonfinite", "data_index": 4999, "action": "skip"},
            {"step": 9000, "kind": "rollback", "from_step": 9010, "batches_skipped": [9000, 9010]},
            {"step": 11000, "kind": "checkpoint", "bytes": 11_000_000, "seconds": 0.2},
        ]
    (folder / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = {"steps": steps, "tokens": steps * TOKENS, "unigram_entropy": 6.5, "params": 950912}
    summary |= {"val_loss": evals[-1]["val_loss"], "tokens_per_s": 16200.0, "mfu": 0.3}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "status.json").write_text(json.dumps({"state": "finished", "step": steps, "active_s": steps * 0.2}))
    return RunDir(folder)


def fork(parent: RunDir, folder: Path, at: int, steps: int) -> RunDir:
    """A fork of `parent` at step `at` that logged steps at+1..steps itself."""
    run = write_run(folder, "plain", steps, seed=7)
    for path in (run.metrics_path, run.eval_path):
        kept = [r for r in run.read_jsonl(path) if r["step"] > at]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    parent_record = {"run": parent.name, "path": str(parent.path), "step": at, "checkpoint": f"step-{at:08d}"}
    run.write_json("lineage.json", {"parent": parent_record, "from_scratch": False, "changes": []})
    return run


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("columnar")
    runs = root / "runs"
    made = {"long": write_run(runs / "long", "long", 20_000)}
    for kind in ("diverge", "grads", "plateau", "wrecked", "moe"):
        made[kind] = write_run(runs / kind, kind, 3000, seed=1)
    made["short"] = write_run(runs / "short", "plain", 600, seed=2)
    made["fork"] = fork(made["long"], runs / "fork", 10_000, 12_000)
    return made


@pytest.fixture(autouse=True)
def every_log_cached(monkeypatch):
    """The columnar copy for every log, however short (it is kept only for long ones otherwise)."""
    monkeypatch.setattr(column_cache, "MIN_BYTES", 0)


@pytest.mark.parametrize("kind", ["long", "diverge", "grads", "plateau", "wrecked", "moe"])
def test_doctor_finds_what_the_record_by_record_doctor_found(lab, kind):
    run = lab[kind]
    expected = ref.diagnose(run.path)
    assert diagnose(run.path) == expected  # the cache built on the way
    assert (run.path / ".metrics-cache" / "meta.json").is_file()
    assert diagnose(run.path) == expected  # read from the cache
    found = {f["kind"] for f in expected}
    wanted = {
        "long": {"nonfinite", "loss_spike", "slow_steps", "loader_stall", "slow_rank"},
        "diverge": {"divergence"},
        "grads": {"grad_growth"},
        "plateau": {"plateau"},
        "wrecked": {"no_learning"},
        "moe": {"router_collapse"},
    }[kind]
    assert wanted <= found, found  # the fixture exercises the rules it is meant to


def test_the_metrics_read_by_column_are_the_records(lab):
    run = lab["long"]
    records = run.metrics()
    table = run.metrics_table()
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731  (NaN == NaN)
    assert same(table.records(), records) and table.rows == 20_010  # the line being written is not one
    assert table.record(-1) == records[-1] and table.record(0) == records[0] and same(table.record(4999), records[4999])
    assert table.keys.index("step_time/data_s") > table.keys.index("loss")  # first seen at step 15000
    assert not table.present("step_time/data_s")[:14_000].any()
    assert table.value("phase", 0) == "warmup" and not table.is_number("phase").any()
    assert table.record(399)["big"] == 2**60 and table.record(399)["flag"] is True


@pytest.mark.parametrize(
    "name, source, key",
    [
        ("long", "metrics", "loss"),
        ("long", "metrics", "step_time/data_s"),
        ("long", "metrics", "lr"),
        ("long", "evals", "val_loss"),
        ("fork", "metrics", "loss"),
        ("fork", "metrics", "grad_norm"),
        ("fork", "evals", "lm/bits_per_byte"),
    ],
)
def test_curves_follow_the_lineage_as_before(lab, name, source, key):
    run = lab[name]
    new, old = curves.lineage_series(run, source, key), ref.lineage_series(run, source, key)
    assert [(s.run, s.inherited, s.x, s.steps) for s in new] == [(s.run, s.inherited, s.x, s.steps) for s in old]
    for a, b in zip(new, old):
        assert a.xs == b.xs and [repr(y) for y in a.ys] == [repr(y) for y in b.ys]  # NaN where it was
    if name == "fork":
        assert [s.run for s in new] == ["long", "fork"] and new[0].steps[-1] == 10_000


def test_keys_and_event_positions_as_before(lab):
    for name in ("long", "fork"):
        run = lab[name]
        for source in ("metrics", "evals"):
            assert curves.series_keys(run, source) == ref.series_keys(run, source)
        steps = [0, 1, 5000, 9005, 10_000, 10_001, 11_999, 12_000, 12_500, 25_000]
        for axis in ("tokens", "step"):
            assert curves.step_to_x(run, steps, axis) == ref.step_to_x(run, steps, axis)
    assert "step_time/data_s" in curves.series_keys(lab["long"], "metrics")
    assert "phase" not in curves.series_keys(lab["long"], "metrics")


def test_headlines_and_run_rows_as_before(lab, tmp_path):
    for name in ("long", "fork", "short"):
        run = lab[name]
        last = ref.last_metrics(run)
        row = run_row(run)
        assert row["steps"] == max(last.get("step", 0), run.summary()["steps"], run.status().get("step") or 0)
        assert row["tokens"] == last.get("tokens")
        head = headline(run, name)
        assert head["tokens"] == last.get("tokens") and head["steps"] == run.summary()["steps"]
    result = compare_runs([lab["long"].path, lab["fork"].path, lab["short"].path], tmp_path / "cmp", log=lambda _: None)
    drawn = result["plots"][0]["runs"]
    assert drawn["long"] == [
        {"run": "long", "inherited": False, "points": 20_010}
    ]  # the NaN too, and the repeated steps
    assert drawn["fork"] == [{"run": "fork", "inherited": False, "points": 2000}]  # its parent is drawn already
    with Image.open(result["png"]) as img:
        assert img.size == (800, 700)


def test_a_long_runs_report_has_its_figures(lab, tmp_path):
    paths = write_report(lab["long"].path, tmp_path / "rep", log=lambda _: None)
    assert [p.name for p in paths["figures"]] == ["loss.png", "lr.png", "grad_norm.png", "throughput.png"]
    md = paths["md"].read_text()
    assert "| long | 5,000 | nonfinite | skip |" in md


def test_a_run_still_appending_is_read_to_its_last_complete_line(lab, tmp_path):
    run = write_run(tmp_path / "live", "plain", 500, seed=3)
    first = diagnose(run.path)
    assert first == ref.diagnose(run.path)
    with open(run.metrics_path, "a") as f:
        for s in range(501, 800):
            f.write(json.dumps({"step": s, "tokens": s * TOKENS, "loss": 2.7, "lr": 1e-3, "grad_norm": 0.5}) + "\n")
        f.write('{"step": 800, "tokens": 3276')
    assert run.metrics_table().rows == 799
    assert diagnose(run.path) == ref.diagnose(run.path)
    assert run_row(run)["tokens"] == 799 * TOKENS
