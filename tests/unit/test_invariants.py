"""Runtime invariants in one process (kiln.train.callbacks.invariants): a normal run, guard-skipped
updates (fused and not), a rollback, a resume, a fork with new tensors and a run resumed with the
check newly enabled pass; a wrong normaliser, a wrong optimizer step count and a rank reading a
window twice are caught, recorded in events.jsonl and end the run with one line. The replica and
data-disjointness checks across ranks are tested under torchrun in
tests/distributed/test_invariants_dist.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides, write_corpus

import kiln.train.callbacks.invariants as inv
from kiln.config import load_config
from kiln.errors import ConfigError, KilnError
from kiln.runs.fork import create_fork
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

pytestmark = pytest.mark.usefixtures("one_thread")
ON = ['callbacks.enabled=["invariants"]', "callbacks.invariants.every=1"]


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    root = tmp_path_factory.mktemp("invariants")
    corpus = write_corpus(root / "corpus")

    def build(*extra: str, preset: str = "tiny"):
        return load_config(preset=preset, overrides=tiny_overrides(corpus, root / "cache", *extra))

    return build, root / "runs"


def events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class NanAt(Callback):
    """The loss of these 0-based steps is NaN (the guard discards their updates)."""

    def __init__(self, *steps: int):
        super().__init__()
        self.steps, self.fired = set(steps), set()

    def on_loss(self, trainer, step, loss):
        if step in self.steps and step not in self.fired:
            self.fired.add(step)
            return loss * float("nan")
        return loss


def test_a_normal_run_passes_every_check(make):
    build, runs = make
    summary = start_run(build(*ON, "train.steps=6"), runs, "clean")
    assert summary["invariant_checks"] == 6
    assert not [e for e in events(runs / "clean") if e["kind"] == "invariant"]


def test_masked_objective_and_micro_batches_pass(make):
    build, runs = make
    cfg = build(*ON, "train.steps=3", "train.micro_batch_size=2", preset="bert-tiny")
    assert start_run(cfg, runs, "masked")["invariant_checks"] == 3


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_guard_skipped_updates_pass(make, impl):
    build, runs = make
    cfg = build(*ON, "train.steps=6", "guard.on_nonfinite=skip", f"optim.implementation={impl}")
    summary = start_run(cfg, runs, f"skip-{impl}", callbacks=[NanAt(0, 3)])  # the first update is discarded too
    assert summary["invariant_checks"] == 6
    assert [e["kind"] for e in events(runs / f"skip-{impl}") if e["kind"] != "checkpoint"] == ["nonfinite", "nonfinite"]


def test_rollback_and_resume_pass(make):
    build, runs = make
    cfg = build(*ON, "train.steps=8", "guard.on_nonfinite=rollback", "checkpoint.every=3", "log.every=1")
    summary = start_run(cfg, runs, "rollback", callbacks=[NanAt(4)])
    assert summary["invariant_checks"] >= 8
    kinds = [e["kind"] for e in events(runs / "rollback")]
    assert "rollback" in kinds and "invariant" not in kinds
    state = json.loads((runs / "rollback" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["trainer"]["callbacks"]["invariants"] == {"discarded": 0, "late": {}}
    summary = resume_run(runs / "rollback", overrides=["train.steps=11"])  # from step 8's checkpoint
    assert summary["steps"] == 11 and summary["invariant_checks"] == 3


def test_enabled_on_resume_calibrates_then_checks(make):
    build, runs = make
    cfg = build("train.steps=4", "checkpoint.every=2", "guard.on_nonfinite=skip")
    start_run(cfg, runs, "late-on", callbacks=[NanAt(1)])  # a discarded update the new callback never saw
    summary = resume_run(runs / "late-on", overrides=[*ON, "train.steps=7"])
    assert summary["invariant_checks"] == 3


def test_fork_with_new_tensors_passes(make):
    build, runs = make
    start_run(
        build(*ON, "train.steps=4", "checkpoint.every=2", "guard.on_nonfinite=skip"),
        runs,
        "parent",
        callbacks=[NanAt(0)],
    )
    fork = create_fork(runs / "parent", "child", 4, sets=["model.qk_norm=true", "train.steps=7"], log=lambda *a: None)
    assert (fork.run.lineage() if hasattr(fork, "run") else json.loads((runs / "child" / "lineage.json").read_text()))[
        "new_tensors"
    ]
    summary = resume_run(runs / "child")
    assert summary["invariant_checks"] == 3
    state = json.loads((runs / "child" / "checkpoints" / "step-00000006" / "state.json").read_text())
    late = state["trainer"]["callbacks"]["invariants"]["late"]
    assert late and set(late.values()) == {3}  # 4 steps, 1 discarded: the new gains missed 3 updates


class HalfNormaliser(Callback):
    """At 0-based step `at` the loss is normalised by half the tokens (a local-count bug)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_step_start(self, trainer, step, data_index):
        par = trainer.par
        if step == self.at:
            original = type(par).data_sum.__get__(par)
            par.data_sum = lambda t: original(t) * 0.5
        else:
            par.__dict__.pop("data_sum", None)


class ExtraOptimizerStep(Callback):
    def on_step_end(self, trainer, result):
        if result.step == 2:
            opt = trainer.module.optimizers[0]
            state = opt.state[next(iter(opt.state))]
            state["step"] += 1


class RepeatWindow(Callback):
    """This rank reads its first window of each batch in every row."""

    def on_run_start(self, trainer):
        sampler = trainer.sampler
        original = type(sampler).sample_indices.__get__(sampler)
        sampler.sample_indices = lambda step: np.repeat(original(step)[:1], sampler.local_batch)


@pytest.mark.parametrize(
    "hook, invariant, step, detail",
    [
        (HalfNormaliser(2), "loss normaliser", 3, "rank 0 normalises the loss by 1/"),
        (ExtraOptimizerStep(), "optimizer steps", 2, "has taken 3 optimizer steps on rank 0, expected 2"),
        (RepeatWindow(), "disjoint data", 1, "rank 0 (data-parallel rank 0) reads window"),
    ],
)
def test_violations_end_the_run_with_one_line(make, hook, invariant, step, detail):
    build, runs = make
    name = invariant.replace(" ", "-")
    with pytest.raises(inv.InvariantViolation) as caught:
        start_run(build(*ON, "train.steps=5"), runs, name, callbacks=[hook])
    message = str(caught.value)
    assert isinstance(caught.value, KilnError) and "\n" not in message
    assert message.startswith(f"invariant '{invariant}' violated at step {step}: ") and detail in message
    recorded = [e for e in events(runs / name) if e["kind"] == "invariant"]
    assert len(recorded) == 1 and recorded[0]["step"] == step and recorded[0]["invariant"] == invariant
    assert recorded[0]["ranks"] == [0] and recorded[0]["message"] == message


def test_every_and_options(make):
    build, runs = make
    summary = start_run(
        build('callbacks.enabled=["invariants"]', "callbacks.invariants.every=3", "train.steps=7"), runs, "every3"
    )
    assert summary["invariant_checks"] == 3  # steps 1, 3, 6
    with pytest.raises(ConfigError, match="callbacks.invariants.every"):
        from kiln.train.callbacks.registry import build_callbacks

        build_callbacks(build('callbacks.enabled=["invariants"]', "callbacks.invariants.every=-1").callbacks)


def test_the_debug_section_builds_it(make):
    from kiln.train.callbacks.builtin import builtin_callbacks

    build, runs = make
    cfg = build("debug.invariants=true", "debug.invariants_every=2", "train.steps=4")
    assert sum(isinstance(c, inv.Invariants) for c in builtin_callbacks(cfg)) == 1
    assert start_run(cfg, runs, "debug")["invariant_checks"] == 3  # steps 1, 2, 4


def test_debug_section_turns_the_invariants_on():
    from kiln.config import load_config
    from kiln.train.callbacks.builtin import builtin_callbacks

    assert not any(isinstance(c, inv.Invariants) for c in builtin_callbacks(load_config("tiny")))
    on = builtin_callbacks(load_config("tiny", overrides=["debug.invariants=true", "debug.invariants_every=7"]))
    assert sum(isinstance(c, inv.Invariants) for c in on) == 1
