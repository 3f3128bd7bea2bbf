"""`train.time_budget_s`: the run measures its step time, trains the steps that fit, records the
decision, and resumes exactly; a run given that many steps outright logs the same losses."""

from __future__ import annotations

import json

import pytest

from kiln.config import load_config
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

pytestmark = pytest.mark.usefixtures("one_thread")


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class SlowSteps(Callback):
    """Makes every step take ~60 ms more, so the budget (1.5 s) cuts the run to ~20 steps; the sleep
    dominates the step time, so another test busy beside this one (pytest-xdist) moves the count little."""

    def on_step_end(self, trainer, result):
        import time

        time.sleep(0.06)


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
        "train.time_budget_s=1.5",
        "schedule.warmup_steps=15",
        "checkpoint.every=12",
        "model.dropout=0.1",
    )
    with pytest.raises(KeyboardInterrupt):
        start_run(tiny_config(corpus, *extra), tmp_path / "runs", "budget", callbacks=[SlowSteps(), CrashAt(12)])
    run = tmp_path / "runs" / "budget"
    event = next(e for e in jsonl(run / "events.jsonl") if e["kind"] == "time_budget")
    steps = event["steps"]
    assert event["step"] == 11 and 17 <= steps < 400  # decided after 3 + 8 timed steps, before any checkpoint
    saved = load_config(config_file=run / "config.toml")
    assert saved.train.steps == steps and saved.train.time_budget_s == 0
    summary = resume_run(run)
    assert summary["steps"] == steps
    # the same run told its step count from the start: identical losses (the decision fell in the warmup)
    start_run(tiny_config(corpus, *extra[2:], f"train.steps={steps}"), tmp_path / "runs", "fixed")
    assert [r["loss"] for r in jsonl(run / "metrics.jsonl")] == [
        r["loss"] for r in jsonl(tmp_path / "runs" / "fixed" / "metrics.jsonl")
    ]
