"""Unit tests of the loop's parts: the process group's backends, the checkpoint policy's error
handling, the watchdog's limits, the metric recorder, dropout seeds, validation shares, the time
budget's decision, the plugin loader and the run folder's truncation."""

from __future__ import annotations

import errno
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from kiln.errors import KilnError

# --------------------------------------------------------------------------- process group


def test_gpus_get_a_process_group_with_a_cpu_backend_too(monkeypatch):
    """NCCL has no CPU backend: the checkpoint writers' agreement flags and the object
    collectives are CPU tensors, so a GPU job needs gloo beside NCCL in its process group."""
    import torch.distributed as dist

    from kiln.parallel import mesh

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("device", i))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.setdefault("backend", backend))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    mesh.init_process_group(mesh.ProcessInfo(rank=3, world_size=4, local_rank=3))
    assert seen == {"device": 3, "backend": "cpu:gloo,cuda:nccl"}
    assert mesh.backend_for(cuda=False) == "gloo"


# --------------------------------------------------------------------------- checkpoint policy


def stub_trainer(tmp_path, on_error: str, waiting):
    from kiln.runs.rundir import RunDir

    events = []
    (tmp_path / "run").mkdir(exist_ok=True)
    checkpointer = SimpleNamespace(pending=True, wait=waiting)
    trainer = SimpleNamespace(
        step=7,
        run=RunDir(tmp_path / "run"),
        is_main=True,
        checkpointer=checkpointer,
        said=[],
        cfg=SimpleNamespace(checkpoint=SimpleNamespace(on_error=on_error)),
        callbacks=SimpleNamespace(on_checkpoint=lambda *a: events.append(a)),
    )
    trainer.say = trainer.said.append

    class Paused:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    trainer.paused = lambda what: Paused()
    return trainer, events


def full_disk():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_async_commit_follows_checkpoint_on_error(tmp_path):
    from kiln.train.checkpoint_policy import CheckpointPolicy

    trainer, events = stub_trainer(tmp_path, "stop", full_disk)
    with pytest.raises(KilnError, match="No space left on device.*earlier checkpoints are intact.*--resume"):
        CheckpointPolicy().flush(trainer)  # a KilnError (one line), not a bare OSError
    assert json.loads((tmp_path / "run" / "events.jsonl").read_text())["kind"] == "checkpoint_failed"
    trainer, events = stub_trainer(tmp_path, "continue", full_disk)
    CheckpointPolicy().flush(trainer)
    assert events == [] and "continuing" in trainer.said[-1]


def test_the_checkpoint_event_comes_with_the_commit(tmp_path):
    from kiln.train.checkpoint_policy import CheckpointPolicy

    path = tmp_path / "step-00000007"
    trainer, events = stub_trainer(tmp_path, "stop", lambda: path)
    # the loop wires a commit to its callbacks' on_checkpoint (Trainer.__post_init__)
    CheckpointPolicy(committed=lambda step, p: trainer.callbacks.on_checkpoint(trainer, step, p)).flush(trainer)
    assert events == [(trainer, 7, path)]


# --------------------------------------------------------------------------- watchdog


def test_watchdog_limits(tmp_path):
    from kiln.config import GuardConfig
    from kiln.train.hang_timer import SLACK, Watchdog

    dog = Watchdog(GuardConfig(hang_min_s=2.0, hang_factor=5.0), tmp_path, 0)
    assert dog.limit() == SLACK * 2.0  # between steps: the floor, stretched
    for seconds in (0.3, 0.01, 0.01, 0.01):
        dog.step_started()
        dog.mark -= seconds  # a step that took `seconds`
        dog.step_ended()
        time.sleep(0.001)
    dog.mark -= 100  # a long evaluation between steps ...
    dog.step_started()  # ... is not a step duration
    assert len(dog.durations) == 4 and max(dog.durations) < 1
    assert dog.limit() == 2.0  # in a step: max(hang_min_s, 5 x median of the steady steps)
    dog.durations = [1.0] * 5
    assert dog.limit() == 5.0


# --------------------------------------------------------------------------- recorder, seeds, shares


def test_recorder_reduces_over_the_interval():
    from kiln.train.callbacks.recorder import MetricRecorder

    r = MetricRecorder(torch.device("cpu"))
    for v in (1.0, 2.0, 6.0):
        r.record("m", torch.tensor(v))
        r.record("s", v, "sum")
        r.record("hi", v, "max")
        r.record("lo", v, "min")
    assert r.collect() == {"hi": 6.0, "lo": 1.0, "m": 3.0, "s": 9.0}
    assert r.collect() == {}
    with pytest.raises(ValueError, match="reduce must be one of"):
        r.record("x", 1.0, "median")
    r.record("x", 1.0, "sum")
    with pytest.raises(ValueError, match="after reduce='sum'"):
        r.record("x", 1.0, "max")


def test_dropout_seeds_differ_per_data_parallel_rank():
    from kiln.train.seeding import dropout_seed

    seeds = [dropout_seed(0, r) for r in range(8)]
    assert seeds[0] == 0 and len(set(seeds)) == 8
    assert dropout_seed(5, 3) == dropout_seed(5, 3) != dropout_seed(6, 3)


@pytest.mark.parametrize("n, world, multiple", [(50, 2, 8), (50, 1, 4), (7, 3, 2), (3, 4, 1), (16, 2, 8)])
def test_shares_cover_every_window_once(n, world, multiple):
    from kiln.data.loader import share_windows

    windows = torch.arange(n)[:, None].expand(n, 5)
    shares = [share_windows(windows, r, world, multiple) for r in range(world)]
    assert len({len(s.windows) for s in shares}) == 1  # every rank runs the same forwards
    assert all(len(s.windows) % multiple == 0 for s in shares)
    real = [int(w[0]) for s in shares for w in s.windows[: s.valid]]
    assert real == list(range(n))
    assert [s.first_index for s in shares] == [min(r * -(-n // world), n) for r in range(world)]


# --------------------------------------------------------------------------- time budget


def test_time_budget_estimates_from_the_budget_left_and_commits_late(tmp_path):
    from kiln.config import load_config, to_toml
    from kiln.runs.rundir import RunDir
    from kiln.train.callbacks.budget import COMMIT_FRACTION, TimeBudget, estimate_steps, length_floor
    from kiln.train.trainer import Trainer

    # the steps done plus what the budget left buys at the recent rate; never past the ceiling
    assert estimate_steps(done=20, spent_s=10.0, per_step=0.25, budget_s=60.0, ceiling=1000) == 220
    assert estimate_steps(done=20, spent_s=10.0, per_step=0.001, budget_s=60.0, ceiling=1000) == 1000
    assert estimate_steps(done=20, spent_s=70.0, per_step=0.25, budget_s=60.0, ceiling=1000) == 20
    cfg = load_config("tiny", overrides=["schedule.name=wsd", "schedule.warmup_steps=10"]).schedule
    # a WSD length whose decay starts after the 100 steps trained: T - round(0.2 (T - 10)) >= 100
    assert length_floor(100, 1000, cfg) == 122 and length_floor(5, 1000, cfg) == 12
    assert length_floor(100, 1000, load_config("tiny").schedule) == 101

    made = iter(range(100))

    def trainer_at(step, schedule="wsd"):
        cfg = load_config(
            "tiny",
            overrides=[
                "train.steps=1000",
                "train.time_budget_s=60",
                "schedule.warmup_steps=10",
                f"schedule.name={schedule}",
            ],
        )
        run = tmp_path / f"run{next(made)}"
        run.mkdir()
        trainer = SimpleNamespace(
            cfg=cfg,
            step=step,
            total_steps=1000,
            is_main=True,
            run=RunDir(run),
            said=[],
            par=SimpleNamespace(is_main=True),
        )
        trainer.say = trainer.said.append
        # the loop's actions the budget takes, as the trainer implements them
        trainer.set_total_steps = lambda steps, final=False: Trainer.set_total_steps(trainer, steps, final)
        trainer.log_event = lambda event: Trainer.log_event(trainer, event)
        return trainer

    # early: a provisional length, nothing written
    trainer = trainer_at(11)
    TimeBudget().reestimate(trainer, spent=5.0, per_step=0.25)
    assert trainer.total_steps == 11 + 220 and trainer.cfg.train.time_budget_s == 60
    assert not (trainer.run.path / "events.jsonl").exists()
    # once COMMIT_FRACTION of the budget is spent: committed, written to config.toml and events.jsonl
    trainer = trainer_at(150)
    TimeBudget().reestimate(trainer, spent=COMMIT_FRACTION * 60, per_step=0.25)
    assert trainer.total_steps == 246 and trainer.cfg.train.steps == 246 and trainer.cfg.train.time_budget_s == 0
    saved = load_config(config_file=trainer.run.path / "config.toml")
    assert saved.train.steps == 246 and saved.train.time_budget_s == 0  # a resume trains exactly these
    event = json.loads((trainer.run.path / "events.jsonl").read_text())
    assert event["kind"] == "time_budget" and event["steps"] == 246 and event["ceiling"] == 1000
    assert to_toml(trainer.cfg)  # still a valid config
    # a WSD decay that would begin before the next estimate commits early, the decay after step 100
    trainer = trainer_at(100)
    TimeBudget().reestimate(trainer, spent=20.0, per_step=2.0)
    assert trainer.cfg.train.time_budget_s == 0 and trainer.total_steps == 122
    # a cosine run at the same point only follows the estimate (its LR depends on the length anyway)
    trainer = trainer_at(100, "cosine")
    TimeBudget().reestimate(trainer, spent=20.0, per_step=2.0)
    assert trainer.cfg.train.time_budget_s == 60 and trainer.total_steps == 120
    # at most train.steps; at least the warmup plus two
    for per_step, expected in ((0.001, 1000), (100.0, 12)):
        trainer = trainer_at(5)
        TimeBudget().reestimate(trainer, spent=40.0, per_step=per_step)
        assert trainer.total_steps == expected


# --------------------------------------------------------------------------- plugins


def test_plugin_loader(tmp_path, monkeypatch):
    from kiln import plugins

    monkeypatch.setattr(plugins, "_loaded", {})
    for var in plugins.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    counter = tmp_path / "count.txt"
    path = tmp_path / "mine.py"
    path.write_text(f"open({str(counter)!r}, 'a').write('x')\n")
    plugins.load_plugins([str(path), str(path)])
    monkeypatch.setenv("KILN_PLUGINS", str(path))
    plugins.load_plugins([str(path)])
    assert counter.read_text() == "x"  # imported once, however often it is named
    with pytest.raises(KilnError, match="plugin file .*nope.py' does not exist"):
        plugins.load_plugins([str(tmp_path / "nope.py")])
    with pytest.raises(KilnError, match="plugin 'no_such_module_x' cannot be imported"):
        plugins.load_plugins(["no_such_module_x"])


# --------------------------------------------------------------------------- run folder


def test_truncate_after_covers_every_file(tmp_path):
    from kiln.config import Config
    from kiln.runs.rundir import RunDir

    run = RunDir.create(tmp_path, "r", Config())
    for step in (5, 10, 15):
        run.log_metrics({"step": step, "loss": 1.0})
        run.log_eval({"step": step, "val_loss": 1.0})
        run.log_event({"step": step, "kind": "skip"})
        run.append("layer_stats.jsonl", {"step": step, "module": "m"})
        run.write_json(f"eval/step-{step}.json", {"step": step})
        (run.eval_dir / f"step-{step}").mkdir()
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 16, "lo')  # a torn line
    run.truncate_after(10)
    for log in ("metrics.jsonl", "eval.jsonl", "events.jsonl", "layer_stats.jsonl"):
        assert [r["step"] for r in run.read_jsonl(run.path / log)] == [5, 10], log
    assert sorted(p.name for p in run.eval_dir.iterdir()) == ["step-10", "step-10.json", "step-5", "step-5.json"]
    run.log_event({"step": 12, "kind": "rollback"})
    run.truncate_after(5, keep=("events.jsonl",))
    assert [r["step"] for r in run.events()] == [5, 10, 12] and [r["step"] for r in run.metrics()] == [5]
