"""Exact resume: a run killed after a checkpoint and resumed logs the very same losses."""

import json

import pytest
import torch

from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

N = 6


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Kills the run (by raising) once step `at` is logged."""

    order = 99  # after the metrics writer (91)

    def __init__(self, at: int, exc: type[BaseException] = Crash):
        super().__init__()
        self.at, self.exc = at, exc

    def on_log(self, trainer, record):
        if record["step"] == self.at:
            raise self.exc(f"simulated kill at step {self.at}")


class Recorder(Callback):
    def __init__(self):
        super().__init__()
        self.steps, self.evals, self.checkpoints = [], [], []

    def on_step_end(self, trainer, result):
        self.steps.append(result.step)

    def on_eval(self, trainer, record):
        self.evals.append(record["step"])

    def on_checkpoint(self, trainer, step, path):
        assert (path / "manifest.json").is_file()  # committed before the event
        self.checkpoints.append(path.name)


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    from kiln.config import load_config

    root = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(root / "corpus")

    def cfg(*extra):
        return load_config(
            preset="tiny",
            overrides=tiny_overrides(
                corpus,
                root / "cache",
                f"train.steps={2 * N}",
                f"checkpoint.every={N}",
                "checkpoint.keep=0",
                "log.every=1",
                "eval.every=4",
                "model.dropout=0.2",
                "schedule.warmup_steps=3",
                *extra,
            ),
        )

    recorder = Recorder()
    torch.manual_seed(0)  # runs must not depend on this (see test_same_seed_same_losses); resume must not either
    start_run(cfg(), root / "runs", "full", callbacks=[recorder])
    return root, cfg, recorder


def test_same_seed_same_losses(setup):
    """Two runs of one config (dropout on) log identical losses, whatever the process's RNG state was."""
    root, cfg, _ = setup
    torch.manual_seed(12345)
    with pytest.raises(Crash):  # the same config (so the same LR schedule), stopped after 3 steps
        start_run(cfg(), root / "runs", "again", callbacks=[CrashAt(3)])
    full = jsonl(root / "runs" / "full" / "metrics.jsonl")[:3]
    again = jsonl(root / "runs" / "again" / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in full]


def test_deterministic_algorithms_train_on_the_cpu_with_the_same_losses(setup):
    """train.deterministic = true: no op of a training step, evaluation or checkpoint refuses
    torch.use_deterministic_algorithms on the CPU, and the losses are the same bits (CPU kernels
    were deterministic already)."""
    root, cfg, _ = setup
    try:
        with pytest.raises(Crash):  # past the evaluation at step 4 and the checkpoint at step N
            start_run(cfg("train.deterministic=true"), root / "runs", "deterministic", callbacks=[CrashAt(N + 1)])
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    full = jsonl(root / "runs" / "full" / "metrics.jsonl")[: N + 1]
    ours = jsonl(root / "runs" / "deterministic" / "metrics.jsonl")
    assert [r["loss"] for r in ours] == [r["loss"] for r in full]
    assert (
        jsonl(root / "runs" / "deterministic" / "eval.jsonl")[0]["val_loss"]
        == (jsonl(root / "runs" / "full" / "eval.jsonl")[0]["val_loss"])
    )


def test_hooks_are_called(setup):
    _, _, rec = setup
    assert rec.steps == list(range(1, 2 * N + 1))
    assert rec.evals == [4, 8, 12]
    assert rec.checkpoints == [f"step-{N:08d}", f"step-{2 * N:08d}"]


@pytest.mark.parametrize("case", ["after-checkpoint", "keyboard-interrupt", "corrupt-newest"])
def test_resume_is_bit_identical(setup, case):
    root, cfg, _ = setup
    runs = root / "runs"
    name = f"cut-{case}"
    if case == "corrupt-newest":
        config, crash = cfg("checkpoint.every=3"), CrashAt(N + 2)
    elif case == "keyboard-interrupt":
        config, crash = cfg(), CrashAt(N + 1, KeyboardInterrupt)
    else:
        config, crash = cfg(), CrashAt(N + 2)
    torch.manual_seed(0)  # the same starting RNG as the full run, so that only resume is tested here
    with pytest.raises(crash.exc, match="simulated kill"):
        start_run(config, runs, name, callbacks=[crash])
    torch.manual_seed(999)  # a resumed process starts with some other RNG state
    run = runs / name
    logged = [r["step"] for r in jsonl(run / "metrics.jsonl")]
    assert logged == list(range(1, crash.at + 1))  # the killed run got past its checkpoint
    assert not (run / "summary.json").exists()

    expected_from = N
    if case == "corrupt-newest":
        victim = run / "checkpoints" / f"step-{N:08d}" / "model.safetensors"
        raw = bytearray(victim.read_bytes())
        raw[-5] ^= 0x10
        victim.write_bytes(bytes(raw))
        expected_from = 3

    rec = Recorder()
    summary = resume_run(run, callbacks=[rec])
    assert rec.steps == list(range(expected_from + 1, 2 * N + 1))  # continued from the checkpoint

    full, resumed = jsonl(runs / "full" / "metrics.jsonl"), jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in resumed]
    assert steps == list(range(1, 2 * N + 1))  # no duplicates, no gaps
    for a, b in zip(full, resumed):
        assert a["step"] == b["step"]
        assert a["loss"] == b["loss"], f"step {a['step']}: {a['loss']!r} != {b['loss']!r}"
        assert a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"] and a["tokens"] == b["tokens"]
    full_eval, resumed_eval = jsonl(runs / "full" / "eval.jsonl"), jsonl(run / "eval.jsonl")
    assert [e["step"] for e in resumed_eval] == [4, 8, 12]
    assert [e["val_loss"] for e in resumed_eval] == [e["val_loss"] for e in full_eval]
    full_summary = json.loads((runs / "full" / "summary.json").read_text())
    assert summary["val_loss"] == full_summary["val_loss"] and summary["steps"] == 2 * N
    final = f"step-{2 * N:08d}"
    assert (run / "checkpoints" / final / "model.safetensors").read_bytes() == (
        runs / "full" / "checkpoints" / final / "model.safetensors"
    ).read_bytes()


def test_resume_of_a_finished_run_does_not_train_again(setup):
    root, cfg, _ = setup
    start_run(cfg("train.steps=3", "checkpoint.every=0"), root / "runs", "short")
    run = root / "runs" / "short"
    before = jsonl(run / "metrics.jsonl")
    rec = Recorder()
    resume_run(run, callbacks=[rec])
    assert rec.steps == []
    assert jsonl(run / "metrics.jsonl") == before


def test_resume_with_an_override_extends_the_run(setup):
    root, cfg, _ = setup
    start_run(cfg("train.steps=4", "checkpoint.every=0", "schedule.name=constant"), root / "runs", "extend")
    run = root / "runs" / "extend"
    rec = Recorder()
    summary = resume_run(run, overrides=["train.steps=6"], callbacks=[rec])
    assert rec.steps == [5, 6] and summary["steps"] == 6
    assert "steps = 6" in (run / "config.toml").read_text()
    assert [r["step"] for r in jsonl(run / "metrics.jsonl")] == list(range(1, 7))


def test_resume_refuses_changed_data(setup, tmp_path):
    from conftest import tiny_overrides, write_corpus

    from kiln.config import load_config
    from kiln.errors import KilnError

    root, cfg, _ = setup
    corpus = write_corpus(tmp_path / "corpus", n_files=12)
    start_run(
        load_config(preset="tiny", overrides=tiny_overrides(corpus, tmp_path / "cache", "train.steps=2")),
        tmp_path / "runs",
        "r",
    )
    run = tmp_path / "runs" / "r"
    other = write_corpus(tmp_path / "other", seed=5)
    with pytest.raises(KilnError, match="data"):  # another corpus
        resume_run(run, overrides=[f"data.corpus={other}", "train.steps=3"])
    with open(corpus / "doc000.txt", "a") as f:  # the same corpus path, with changed contents
        f.write("an extra line that changes the dataset\n")
    with pytest.raises(KilnError, match="changed"):
        resume_run(run, overrides=["train.steps=3"])
    assert [r["step"] for r in jsonl(run / "metrics.jsonl")] == [1, 2]


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="not a Kiln run folder"):
        resume_run(tmp_path)


def test_a_run_resumes_in_the_window_order_it_was_made_with(tiny_config, shared_corpus, tmp_path):
    """Checkpoints record the order's version; those made before it resume in the former order."""
    from kiln.data.order import ORDER_VERSION
    from kiln.data.shards import prepare
    from kiln.parallel.runtime import Parallel
    from kiln.runs.rundir import RunDir
    from kiln.train.build import build_trainer
    from kiln.train.precision import resolve_device
    from kiln.train.session import check_training

    cfg = tiny_config(shared_corpus)
    spec, data = check_training(cfg), prepare(cfg.data, log=lambda *a: None)
    par = Parallel.setup(cfg, resolve_device(cfg))

    def order(resume_state):
        return build_trainer(cfg, spec, RunDir(tmp_path / "r"), data, par, resume_state=resume_state).sampler.order

    assert order(None) == ORDER_VERSION
    assert order({"trainer": {"step": 4, "order": ORDER_VERSION}}) == ORDER_VERSION
    assert order({"trainer": {"step": 4}}) == "legacy"
    fresh = build_trainer(cfg, spec, RunDir(tmp_path / "r"), data, par)
    assert fresh.state()["order"] == ORDER_VERSION
