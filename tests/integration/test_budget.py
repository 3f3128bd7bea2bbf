"""`train.time_budget_s`: the run measures its step time, trains the steps that fit, records the
decision, and resumes exactly; a run given that many steps outright logs the same losses."""

from __future__ import annotations

import json
import time

import pytest

from kiln.config import load_config
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

pytestmark = pytest.mark.usefixtures("one_thread")


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class SlowSteps(Callback):
    """Makes every step take ~80 ms more, so the budget (3 s) cuts the run to ~30 steps; the sleep
    dominates the step time, so another test busy beside this one (pytest-xdist) moves the count little."""

    def on_step_end(self, trainer, result):
        time.sleep(0.08)


class CrashAt(Callback):
    order = 99

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_checkpoint(self, trainer, step, path):
        if step == self.step:
            raise KeyboardInterrupt


def test_a_budget_cuts_the_run_and_resume_is_exact(tiny_config, make_corpus, tmp_path):
    corpus = make_corpus()
    extra = (
        "train.steps=400",
        "train.time_budget_s=3",
        "schedule.name=wsd",
        "schedule.warmup_steps=15",
        "checkpoint.every=12",
        "model.dropout=0.1",
    )
    # interrupted before the length is committed: the resumed run keeps the budget it had left
    with pytest.raises(KeyboardInterrupt):
        start_run(tiny_config(corpus, *extra), tmp_path / "runs", "budget", callbacks=[SlowSteps(), CrashAt(12)])
    run = tmp_path / "runs" / "budget"
    assert not (run / "events.jsonl").exists() or "time_budget" not in (run / "events.jsonl").read_text()
    summary = resume_run(run, callbacks=[SlowSteps()])
    event = next(e for e in jsonl(run / "events.jsonl") if e["kind"] == "time_budget")
    steps = event["steps"]
    assert summary["steps"] == steps and 17 <= steps < 400
    assert 12 < event["step"] < steps  # committed after the checkpoint, before the end
    # the budget counted the first process's seconds too (else the run would take ~3.9 s)
    assert summary["time_budget"]["used_s"] == pytest.approx(3, rel=0.15)
    saved = load_config(config_file=run / "config.toml")
    assert saved.train.steps == steps and saved.train.time_budget_s == 0
    # the same run told its step count from the start: identical losses (WSD's stable phase does not
    # depend on the length, and the committed length starts its decay after the step it was fixed at)
    start_run(tiny_config(corpus, *extra[2:], f"train.steps={steps}"), tmp_path / "runs", "fixed")
    assert [r["loss"] for r in jsonl(run / "metrics.jsonl")] == [
        r["loss"] for r in jsonl(tmp_path / "runs" / "fixed" / "metrics.jsonl")
    ]


class VirtualSteps(Callback):
    """Steps that take `seconds` each on the budget's clock (the first `slow` of them `factor` times
    longer: a busy neighbour at start). The virtual time dominates the real few milliseconds of a
    step, so a busy machine moves the outcome little."""

    order = 1  # before the budget reads its clock

    def __init__(self, seconds, slow=0, factor=1.0):
        super().__init__()
        self.seconds, self.slow, self.factor, self.offset, self.trained = seconds, slow, factor, 0.0, 0

    def clock(self):
        return time.perf_counter() + self.offset

    def on_step_end(self, trainer, result):
        self.offset += self.seconds * (self.factor if self.trained < self.slow else 1.0)
        self.trained += 1


def test_a_noisy_start_does_not_decide_the_length(tiny_config, make_corpus, tmp_path, monkeypatch):
    from kiln.train.callbacks import budget

    corpus = make_corpus()
    extra = ("train.steps=2000", "train.time_budget_s=100", "schedule.warmup_steps=15", "log.every=50")
    outcomes = {}
    for name, steps in (("clean", VirtualSteps(0.5)), ("noisy", VirtualSteps(0.5, slow=15, factor=2.5))):
        monkeypatch.setattr(budget, "clock", steps.clock)
        summary = start_run(tiny_config(corpus, *extra), tmp_path / "runs", name, callbacks=[steps])
        outcomes[name] = summary["time_budget"]
        assert summary["steps"] == outcomes[name]["steps"]
        assert outcomes[name]["used_s"] == pytest.approx(100, rel=0.15)  # the run fits its budget
    clean, noisy = outcomes["clean"]["steps"], outcomes["noisy"]["steps"]
    assert 170 <= clean <= 200  # 100 s at 0.5 s a step, less the real time of the steps
    assert noisy == pytest.approx(clean, rel=0.2)
    # the first eight timed steps alone (what used to decide the length) were 2.5x too slow
    assert outcomes["noisy"]["first_estimate"] < 0.6 * clean
