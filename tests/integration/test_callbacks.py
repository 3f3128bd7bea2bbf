"""Callbacks on real (tiny) runs: the order and arguments of every event, on the plain, the
rollback and the finished-run paths; metrics through the recorder; callback state across a
checkpoint; and the built-in monitoring callbacks (layer_stats, profiler, memory, step_time,
tensorboard, wandb) — present when on, absent and free when off."""

from __future__ import annotations

import json
import time

import pytest
import torch

from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

pytestmark = pytest.mark.usefixtures("one_thread")


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class Events(Callback):
    """Records every event with its step, and checks the arguments on the way."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple] = []

    def on_run_start(self, trainer):
        self.seen.append(("run_start", trainer.step))

    def on_step_start(self, trainer, step, data_index):
        assert step == trainer.step and data_index >= step
        self.seen.append(("step_start", step))

    def on_loss(self, trainer, step, loss):
        assert loss.requires_grad and loss.dim() == 0
        self.seen.append(("loss", step))
        return loss

    def on_after_backward(self, trainer, step):
        assert all(p.grad is not None for p in trainer.module.parameters())
        self.seen.append(("after_backward", step))

    def on_step_end(self, trainer, result):
        assert result.step == trainer.step
        assert isinstance(result.loss, float) == trainer.log_due  # synced exactly at logging steps
        self.seen.append(("step_end", result.step))

    def on_log(self, trainer, record):
        assert record["step"] == trainer.step and "loss" in record and "tokens_per_s" in record
        self.seen.append(("log", record["step"]))

    def on_step_complete(self, trainer):
        self.seen.append(("step_complete", trainer.step))

    def on_eval(self, trainer, record):
        assert "val_loss" in record
        self.seen.append(("eval", record["step"]))

    def on_checkpoint(self, trainer, step, path):
        assert (path / "manifest.json").is_file() and step == trainer.step
        self.seen.append(("checkpoint", step))

    def on_guard_event(self, trainer, event):
        self.seen.append(("guard", event["kind"], event["step"]))

    def on_run_end(self, trainer, summary):
        assert summary["steps"] == trainer.step and "val_loss" in summary
        self.seen.append(("run_end", trainer.step))

    def on_error(self, trainer, error):
        self.seen.append(("error", type(error).__name__))


def test_event_order_and_arguments(tiny_config, make_corpus, tmp_path):
    cfg = tiny_config(
        make_corpus(), "train.steps=4", "log.every=2", "eval.every=2", "checkpoint.every=2", "train.micro_batch_size=2"
    )
    events = Events()
    start_run(cfg, tmp_path / "runs", "order", callbacks=[events])

    def step(n, logged):
        out = [("step_start", n - 1), ("loss", n - 1), ("loss", n - 1), ("after_backward", n - 1), ("step_end", n)]
        if logged:
            out += [("log", n), ("eval", n), ("checkpoint", n)]
        return out + [("step_complete", n)]

    assert events.seen == [
        ("run_start", 0),
        *step(1, False),
        *step(2, True),
        *step(3, False),
        *step(4, True),
        ("run_end", 4),
    ]


def test_error_event_then_the_error(tiny_config, make_corpus, tmp_path):
    class Boom(Callback):
        def on_step_end(self, trainer, result):
            if result.step == 2:
                raise RuntimeError("boom")

    events = Events()
    with pytest.raises(RuntimeError, match="boom"):
        start_run(tiny_config(make_corpus()), tmp_path / "runs", "err", callbacks=[Boom(), events])
    assert events.seen[-1] == ("error", "RuntimeError")


class Spike(Callback):
    def __init__(self, at):
        super().__init__()
        self.at, self.fired = at, False

    def on_loss(self, trainer, step, loss):
        if step == self.at and not self.fired:
            self.fired = True
            return loss * 1e3
        return loss


class Counter(Callback):
    """Counts the steps it saw; its count is saved with checkpoints."""

    name = "counter"

    def __init__(self):
        super().__init__()
        self.count = 0
        self.restored: list[int] = []

    def on_step_end(self, trainer, result):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]
        self.restored.append(self.count)


def test_rollback_path_events_and_callback_state(tiny_config, make_corpus, tmp_path):
    cfg = tiny_config(make_corpus(), "guard.on_spike=rollback", "train.steps=30", "checkpoint.every=5")
    events, counter = Events(), Counter()
    start_run(cfg, tmp_path / "runs", "rb", callbacks=[Spike(23), events, counter])
    seen = events.seen
    i = seen.index(("guard", "loss_spike", 24))
    assert seen[i + 1] == ("guard", "rollback", 20)  # the spike, then the rollback it caused
    assert seen[i + 2] == ("step_start", 20)  # training goes on from the restored checkpoint
    assert not any(e[0] in ("log", "step_end") and e[1] == 24 for e in seen[i - 3 : i + 2])  # step 24 not logged
    assert counter.restored == [20]  # the callback's state came back with the checkpoint ...
    assert counter.count == 30  # ... so it counts the steps of the run that survived, 1..30
    saved = json.loads((tmp_path / "runs" / "rb" / "checkpoints" / "step-00000030" / "state.json").read_text())
    assert saved["trainer"]["callbacks"]["counter"] == {"count": 30}


def test_finished_run_resumed_still_ends_properly(tiny_config, make_corpus, tmp_path):
    cfg = tiny_config(make_corpus(), "train.steps=3")
    start_run(cfg, tmp_path / "runs", "done")
    events = Events()
    summary = resume_run(tmp_path / "runs" / "done", callbacks=[events])
    assert events.seen[0] == ("run_start", 3) and events.seen[-1] == ("run_end", 3)
    assert ("eval", 3) in events.seen and not any(e[0] == "step_start" for e in events.seen)
    assert summary["val_loss"] > 0


def test_recorded_metrics_land_in_the_step_record(tiny_config, make_corpus, tmp_path):
    class Recording(Callback):
        def on_step_end(self, trainer, result):
            trainer.record_metric("custom/mean", float(result.step), "mean")
            trainer.record_metric("custom/sum", 1.0, "sum")
            trainer.record_metric("custom/max", torch.tensor(float(result.step)), "max")
            trainer.record_metric("custom/min", float(result.step), "min")

    start_run(
        tiny_config(make_corpus(), "train.steps=6", "log.every=3"), tmp_path / "runs", "rec", callbacks=[Recording()]
    )
    records = jsonl(tmp_path / "runs" / "rec" / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    assert [(r["custom/mean"], r["custom/sum"], r["custom/max"], r["custom/min"]) for r in records] == [
        (2.0, 3.0, 3.0, 1.0),
        (5.0, 3.0, 6.0, 4.0),
    ]  # each over its logging interval


# --------------------------------------------------------------------------- layer_stats


@pytest.fixture(scope="module")
def stats_runs(tmp_path_factory):
    """A run with layer_stats on, the same run killed after a checkpoint and resumed, and the
    same run with it off."""
    from conftest import tiny_overrides, write_corpus

    from kiln.config import load_config

    root = tmp_path_factory.mktemp("stats")
    corpus = write_corpus(root / "corpus")

    def cfg(*extra):
        return load_config(
            "tiny",
            overrides=tiny_overrides(
                corpus,
                root / "cache",
                "train.steps=8",
                "log.every=1",
                "checkpoint.every=4",
                "model.dropout=0.1",
                *extra,
            ),
        )

    on = ['callbacks.enabled=["layer_stats"]', "callbacks.layer_stats.every=2"]
    start_run(cfg(*on), root / "runs", "on")
    start_run(cfg(), root / "runs", "off")

    class Crash(Callback):
        order = 99

        def on_checkpoint(self, trainer, step, path):
            if step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        start_run(cfg(*on), root / "runs", "killed", callbacks=[Crash()])
    resume_run(root / "runs" / "killed")
    return root / "runs"


def test_layer_stats_records_every_matching_module(stats_runs):
    records = jsonl(stats_runs / "on" / "layer_stats.jsonl")
    modules = {f"layers.{i}.{m}" for i in range(2) for m in ("attn", "mlp")}
    assert {r["module"] for r in records} == modules
    assert sorted({r["step"] for r in records}) == [2, 4, 6, 8]
    assert len(records) == 4 * len(modules)
    for r in records:
        assert r["act_rms"] > 0 and r["act_max_abs"] >= r["act_rms"] and r["grad_norm"] > 0
        assert 0 < r["update_ratio"] < 1
        if r["module"].endswith("attn"):
            assert 0 < r["attn_entropy"] <= torch.log(torch.tensor(32.0)).item() + 1e-6  # at most log(context)
            assert r["attn_logit_max"] is not None
        else:
            assert "attn_entropy" not in r
    assert (stats_runs / "on" / "layer_stats.png").read_bytes()[:4] == b"\x89PNG"


def test_layer_stats_are_nothing_when_off_and_change_no_loss(stats_runs):
    assert not (stats_runs / "off" / "layer_stats.jsonl").exists()
    on = [r["loss"] for r in jsonl(stats_runs / "on" / "metrics.jsonl")]
    off = [r["loss"] for r in jsonl(stats_runs / "off" / "metrics.jsonl")]
    assert on == off  # observing changes nothing, bit for bit


def test_layer_stats_across_a_kill_and_resume(stats_runs):
    full, resumed = stats_runs / "on", stats_runs / "killed"
    assert [r["loss"] for r in jsonl(resumed / "metrics.jsonl")] == [r["loss"] for r in jsonl(full / "metrics.jsonl")]
    assert jsonl(resumed / "layer_stats.jsonl") == jsonl(full / "layer_stats.jsonl")  # no duplicates, no gaps


def test_layer_stats_module_globs(tiny_config, make_corpus, tmp_path):
    from kiln.errors import ConfigError

    cfg = tiny_config(
        make_corpus(),
        "train.steps=2",
        'callbacks.enabled=["layer_stats"]',
        "callbacks.layer_stats.every=1",
        'callbacks.layer_stats.modules=["layers.1.mlp", "norm"]',
    )
    start_run(cfg, tmp_path / "runs", "globs")
    assert {r["module"] for r in jsonl(tmp_path / "runs" / "globs" / "layer_stats.jsonl")} == {"layers.1.mlp", "norm"}
    bad = tiny_config(
        make_corpus("c2"), 'callbacks.enabled=["layer_stats"]', 'callbacks.layer_stats.modules=["nope.*"]'
    )
    with pytest.raises(ConfigError, match="match no module"):
        start_run(bad, tmp_path / "runs", "bad")


# --------------------------------------------------------------------------- other monitors


def test_profiler_writes_a_chrome_trace_and_a_table(tiny_config, make_corpus, tmp_path):
    cfg = tiny_config(
        make_corpus(),
        "train.steps=5",
        'callbacks.enabled=["profiler"]',
        "callbacks.profiler.start=1",
        "callbacks.profiler.steps=2",
    )
    start_run(cfg, tmp_path / "runs", "prof")
    folder = tmp_path / "runs" / "prof" / "profile"
    trace = json.loads((folder / "trace-rank0.json").read_text())
    assert trace["traceEvents"]
    table = (folder / "top_ops-rank0.txt").read_text()
    assert "steps 2..3" in table and "aten::" in table


def test_memory_timeline_on_cpu(tiny_config, make_corpus, tmp_path):
    cfg = tiny_config(make_corpus(), "train.steps=4", 'callbacks.enabled=["memory"]')
    start_run(cfg, tmp_path / "runs", "mem")
    run = tmp_path / "runs" / "mem"
    assert [r["step"] for r in jsonl(run / "memory.jsonl")] == [1, 2, 3, 4]
    assert all(r["rss_gb"] > 0.05 for r in jsonl(run / "memory.jsonl"))
    assert all(r["rss_gb"] > 0 for r in jsonl(run / "metrics.jsonl"))
    assert (run / "memory.png").is_file()


def test_step_time_phases(tiny_config, make_corpus, tmp_path):
    # A known delay inside the forward pass: it must land in forward_backward_s and nowhere else.
    # (Comparing the phases' natural lengths is a race on a busy machine.)
    delay = 0.1

    class SlowForward(Callback):
        def on_run_start(self, trainer):
            for part in trainer.module.parts:
                part.register_forward_pre_hook(lambda *_: time.sleep(delay))

    cfg = tiny_config(make_corpus(), "train.steps=4", "log.every=2", 'callbacks.enabled=["step_time"]')
    start_run(cfg, tmp_path / "runs", "st", callbacks=[SlowForward()])
    records = jsonl(tmp_path / "runs" / "st" / "metrics.jsonl")
    assert len(records) == 2
    for r in records:
        assert r["step_time/forward_backward_s"] >= delay
        assert all(0 <= r[f"step_time/{p}_s"] < delay for p in ("data", "grad_norm", "optimizer"))
        assert r["step_time/comm_s"] == 0.0  # one process: no collectives


def test_tensorboard_event_files(tiny_config, make_corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(make_corpus(), "train.steps=3", 'callbacks.enabled=["tensorboard"]')
    start_run(cfg, tmp_path / "runs", "tb")
    folder = tmp_path / "runs" / "tb" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(folder))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert "eval/val_loss" in acc.Tags()["scalars"]


def test_wandb_offline_needs_no_network(tiny_config, make_corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    cfg = tiny_config(make_corpus(), "train.steps=3", 'callbacks.enabled=["wandb"]')
    start_run(cfg, tmp_path / "runs", "wb")
    offline = list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_an_unknown_callback_or_option_is_one_line(tiny_config, make_corpus, tmp_path, capsys):
    from kiln.cli import main

    corpus = make_corpus()
    args = [
        "train",
        "--set",
        f"data.corpus={corpus}",
        "--set",
        f"data.cache_dir={tmp_path / 'c'}",
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    assert main(args + ["--set", 'callbacks.enabled=["layer_stat"]']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown callback 'layer_stat'; did you mean 'layer_stats'?" in err
    assert main(args + ["--set", 'callbacks.enabled=["layer_stats"]', "--set", "callbacks.layer_stats.every=0"]) == 2
    assert "callbacks.layer_stats.every must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_core_callbacks_are_left_out_only_by_name(tiny_config, shared_corpus, tmp_path):
    """`callbacks.disabled` leaves out a core callback (here checkpoints and samples); listing extras
    never drops one; the run's records and status cannot be disabled (one line, nothing written)."""
    from kiln.errors import ConfigError
    from kiln.train.callbacks.base import Callback, CallbackList
    from kiln.train.session import start_run

    cfg = tiny_config(shared_corpus, "checkpoint.every=2", 'callbacks.disabled=["checkpoints", "samples"]')
    start_run(cfg, tmp_path / "runs", "lean")
    run = tmp_path / "runs" / "lean"
    assert not (run / "checkpoints").exists() and not (run / "samples.txt").exists()
    assert (run / "metrics.jsonl").is_file() and (run / "summary.json").is_file()
    full = tiny_config(shared_corpus, 'callbacks.enabled=["step_time"]')
    start_run(full, tmp_path / "runs", "extras")
    assert (tmp_path / "runs" / "extras" / "samples.txt").is_file()  # an extra added, nothing dropped
    for bad, needle in ((["metrics"], "not a core callback"), (["plot", "nope"], "'nope'")):
        with pytest.raises(ConfigError, match=needle):
            start_run(tiny_config(shared_corpus, f"callbacks.disabled={bad!r}".replace("'", '"')), tmp_path / "r2", "x")
    assert not (tmp_path / "r2").exists()

    class Budget(Callback):  # a core callback's state saved before core callbacks had names
        name = "time_budget"

        def load_state_dict(self, state):
            self.loaded = state

    cb = Budget()
    CallbackList([cb]).load_state_dict({"Budget": {"steps": 7}})
    assert cb.loaded == {"steps": 7}


class Steering(Callback):
    """Acts only through the step interface: vetoes step 3's update, halves the LR from step 4."""

    def __init__(self, stop_at: int = 0):
        super().__init__()
        self.stop_at = stop_at
        self.before: dict[str, torch.Tensor] = {}
        self.vetoed: list[tuple[int, bool, bool]] = []  # (step, discard flag, parameters unchanged)

    def on_step_start(self, trainer, step, data_index):
        if step + 1 == 4:
            trainer.scale_lr(0.5)

    def before_optimizer_step(self, trainer, step):
        if step + 1 != 3:
            return None
        self.before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
        return torch.ones((), dtype=torch.bool, device=trainer.device)  # a device flag: no host sync

    def on_optimizer_step(self, trainer, step, discard):
        if step + 1 == 3:
            same = all(torch.equal(p, self.before[n]) for n, p in trainer.module.named_parameters())
            self.vetoed.append((step + 1, bool(discard), same))

    def on_step_complete(self, trainer):
        if trainer.step == self.stop_at:
            raise KeyboardInterrupt


def test_a_callback_vetoes_an_update_and_scales_the_lr_through_the_interface(tiny_config, shared_corpus, tmp_path):
    base = ("train.steps=6", "log.every=1", "checkpoint.every=4", "schedule.name=constant", "schedule.warmup_steps=0")
    start_run(tiny_config(shared_corpus, *base), tmp_path / "runs", "plain")
    steering = Steering()
    start_run(tiny_config(shared_corpus, *base), tmp_path / "runs", "steered", callbacks=[steering])
    assert steering.vetoed == [(3, True, True)]  # the update was not applied, flagged on the device
    plain = jsonl(tmp_path / "runs" / "plain" / "metrics.jsonl")
    steered = jsonl(tmp_path / "runs" / "steered" / "metrics.jsonl")
    assert [s["lr"] / p["lr"] for p, s in zip(plain, steered)] == [1, 1, 1, 0.5, 0.5, 0.5]
    assert [s["loss"] for s in steered[:3]] == [p["loss"] for p in plain[:3]]
    scaled = [e for e in jsonl(tmp_path / "runs" / "steered" / "events.jsonl") if e["kind"] == "lr_scale"]
    assert scaled == [{"step": 3, "kind": "lr_scale", "factor": 0.5, "lr_multiplier": 0.5}]  # on record
    # the multiplier is the trainer's checkpointed state: resumed from step 4 without the callback,
    # the run goes on at the halved LR and trains exactly as the uninterrupted one
    with pytest.raises(KeyboardInterrupt):
        start_run(tiny_config(shared_corpus, *base), tmp_path / "runs", "cut", callbacks=[Steering(stop_at=5)])
    resume_run(tmp_path / "runs" / "cut")
    cut = jsonl(tmp_path / "runs" / "cut" / "metrics.jsonl")
    assert [(r["step"], r["lr"], r["loss"]) for r in cut] == [(r["step"], r["lr"], r["loss"]) for r in steered]
