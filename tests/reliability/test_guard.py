"""The training guard: injected NaNs and loss spikes are detected, acted on and recorded."""

from __future__ import annotations

import math

import pytest
import torch
from reliability_helpers import read_jsonl, tiny  # noqa: F401  (tiny is a fixture)

from kiln.data.skips import add_range, data_index
from kiln.errors import KilnError
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run


class Inject(Callback):
    """Corrupts the loss at chosen steps (0-based optimizer steps) and records the data used."""

    def __init__(self, nan_at=(), spike_at=(), factor=1e3):
        super().__init__()
        self.nan_at, self.spike_at, self.factor = set(nan_at), set(spike_at), factor
        self.seen: list[tuple[int, int]] = []  # (step, data index)
        self.fired: set[int] = set()

    def on_step_start(self, trainer, step, index):
        self.seen.append((step, index))

    def on_loss(self, trainer, step, loss):
        if step in self.nan_at and step not in self.fired:
            self.fired.add(step)
            return loss * float("nan")
        if step in self.spike_at and step not in self.fired:
            self.fired.add(step)
            return loss * self.factor
        return loss


def test_data_index_and_ranges():
    assert [data_index(s, []) for s in range(4)] == [0, 1, 2, 3]
    skipped = add_range([], 5, 7)
    assert [data_index(s, skipped) for s in range(4, 8)] == [4, 8, 9, 10]
    assert add_range(skipped, 8, 9) == [[5, 9]]
    assert add_range([[1, 2]], 6, 6) == [[1, 2], [6, 6]]


def test_nan_is_skipped_and_recorded(tiny):
    make, runs = tiny
    hook = Inject(nan_at=[12])
    summary = start_run(make("guard.on_nonfinite=skip"), runs, "nan", callbacks=[hook])
    events = [e for e in read_jsonl(runs / "nan" / "events.jsonl") if e["kind"] != "checkpoint"]  # saves' costs
    assert [(e["step"], e["kind"], e["action"]) for e in events] == [(13, "nonfinite", "skip")]
    assert math.isnan(events[0]["loss"])
    assert math.isfinite(summary["val_loss"])  # the bad update never reached the weights
    assert summary["steps"] == 30


def test_spike_rolls_back_and_skips_the_batches(tiny):
    make, runs = tiny
    hook = Inject(spike_at=[23])
    cfg = make("guard.on_spike=rollback", "guard.margin=2", "guard.lr_factor=0.5", "guard.lr_factor_steps=5")
    start_run(cfg, runs, "spike", callbacks=[hook])
    events = read_jsonl(runs / "spike" / "events.jsonl")
    spike = [e for e in events if e["kind"] in ("loss_spike", "grad_spike")]
    rollback = [e for e in events if e["kind"] == "rollback"]
    assert len(spike) == 1 and spike[0]["step"] == 24 and spike[0]["action"] == "rollback"
    assert rollback == [
        {"step": 20, "kind": "rollback", "from_step": 24, "checkpoint": "step-00000020", "batches_skipped": [20, 25]}
    ]
    # after the rollback the steps 20.. train on data batches 26.., never on 20..25 again
    after = [idx for step, idx in hook.seen[24:]]
    assert after[0] == 26 and not set(range(20, 26)) & set(after)
    metrics = read_jsonl(runs / "spike" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))  # superseded records were replaced
    lrs = {m["step"]: m["lr"] for m in metrics}
    assert lrs[21] == pytest.approx(0.5 * metrics[20]["lr"] / 0.5, rel=1e-6)  # halved for 5 steps
    state = torch.load  # noqa: F841  (no pickles: the guard state is JSON in the checkpoint)
    import json

    saved = json.loads((runs / "spike" / "checkpoints" / "step-00000030" / "state.json").read_text())
    assert saved["trainer"]["skipped"] == [[20, 25]]


def test_resumed_run_keeps_skipping(tiny):
    make, runs = tiny
    cfg = make("guard.on_spike=rollback")
    start_run(cfg, runs, "a", callbacks=[Inject(spike_at=[23])])

    # a second run killed at step 27 (after the rollback) and resumed
    class Kill(Callback):
        order = 99  # after the metrics writer

        def on_log(self, trainer, record):
            if record["step"] == 27 and trainer.skipped:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        start_run(cfg, runs, "b", callbacks=[Inject(spike_at=[23]), Kill()])
    seen = Inject()
    resume_run(runs / "b", callbacks=[seen])
    assert all(not (20 <= idx <= 23) for _, idx in seen.seen)
    a = [m["loss"] for m in read_jsonl(runs / "a" / "metrics.jsonl")]
    b = [m["loss"] for m in read_jsonl(runs / "b" / "metrics.jsonl")]
    assert a == b


def test_stop_action_ends_with_a_message(tiny):
    make, runs = tiny
    with pytest.raises(KilnError, match="training guard stopped the run at step 11: nonfinite"):
        start_run(make("guard.on_nonfinite=stop"), runs, "stop", callbacks=[Inject(nan_at=[10])])
    events = read_jsonl(runs / "stop" / "events.jsonl")
    assert events[-1]["action"] == "stop"
    from kiln.runs.rundir import RunDir

    status = RunDir(runs / "stop").status()  # what `kiln runs` shows
    assert status["state"] == "stopped" and "nonfinite" in status["reason"]


def test_intervention_cap(tiny):
    make, runs = tiny
    with pytest.raises(KilnError, match="max_interventions"):
        start_run(make("guard.max_interventions=2"), runs, "cap", callbacks=[Inject(nan_at=[5, 8, 11])])
    guard = [e for e in read_jsonl(runs / "cap" / "events.jsonl") if e["kind"] != "checkpoint"]
    assert [e["action"] for e in guard] == ["skip", "skip", "stop"]


def test_a_lasting_level_change_is_not_flagged_forever():
    from kiln.config import GuardConfig
    from kiln.train.guard import Guard

    # the gradient norm's level moves at step 40: recorded (never discarded) for `persist` steps,
    # then the new normal
    guard = Guard(GuardConfig(window=20, min_history=10, k=4.0), torch.device("cpu"))
    flags = []
    for step in range(80):
        norm = 1.0 + 0.01 * (step % 3) if step < 40 else 10.0 + 0.1 * (step % 3)
        flags.append(float(guard.check(step, torch.tensor(3.0 - 0.001 * step), torch.tensor(norm))))
    assert sum(flags) == 0
    assert [(e["step"], e["kind"]) for e in guard.drain()] == [
        (40, "grad_spike"),
        (41, "grad_spike"),
        (42, "grad_spike"),
    ]

    # the loss's level moves: skipped twice, the third in a row is "persistent" (a rollback in a
    # trainer; here on_persistent = skip), then the window restarts from the new level
    guard = Guard(GuardConfig(window=20, min_history=10, k=4.0, on_persistent="skip"), torch.device("cpu"))
    flags = [
        float(guard.check(step, torch.tensor(3.0 + 0.01 * (step % 3) if step < 40 else 9.0), torch.tensor(1.0)))
        for step in range(80)
    ]
    assert flags[40:43] == [1.0, 1.0, 1.0] and sum(flags[43:]) == 0
    assert [e["kind"] for e in guard.drain()] == ["loss_spike", "loss_spike", "persistent_spike"]


def test_robust_detection_ignores_wiggles_and_catches_jumps():
    """The defect of the k-sigma guard: late in training, a 1.4x gradient-norm wiggle over a
    narrow window was called a spike and rolled a healthy run back."""
    from kiln.config import GuardConfig
    from kiln.train.guard import Guard

    guard = Guard(GuardConfig(), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for step in range(60):  # a narrow late-training window: loss 3.0 +- 1%, grad norm 0.8 +- 2%
        loss = 3.0 * (1 + 0.01 * torch.randn((), generator=gen, dtype=torch.float64))
        norm = 0.8 * (1 + 0.02 * torch.randn((), generator=gen, dtype=torch.float64))
        assert float(guard.check(step, loss, norm)) == 0
    assert float(guard.check(60, torch.tensor(3.1), torch.tensor(1.12))) == 0  # 1.4x the norm: a wiggle
    assert float(guard.check(61, torch.tensor(3.05), torch.tensor(0.8))) == 0
    assert not guard.drain()
    assert float(guard.check(62, torch.tensor(6.0), torch.tensor(0.9))) == 1  # 2x the loss: a spike, skipped
    assert float(guard.check(63, torch.tensor(3.0), torch.tensor(8.0))) == 0  # 10x the norm: recorded only
    assert [(e["step"], e["kind"]) for e in guard.drain()] == [(62, "loss_spike"), (63, "grad_spike")]


def test_a_noisy_loss_jump_counts_when_the_gradient_norm_backs_it_up():
    """A masked-LM step predicts few tokens, so its loss is noisy: a corrupted batch's 1.35x loss
    is under k deviations, but its gradient norm spikes too (bench/faults.py, corrupt_batch-mlm).
    The same loss jump with an ordinary gradient norm stays a wiggle."""
    from kiln.config import GuardConfig
    from kiln.train.guard import Guard

    def noisy_guard() -> Guard:
        guard = Guard(GuardConfig(), torch.device("cpu"))
        gen = torch.Generator().manual_seed(1)
        for step in range(60):  # loss 6.3 +- 5.5% (about 80 predicted tokens), grad norm 1.2 +- 15%
            loss = 6.3 * math.exp(0.055 * float(torch.randn((), generator=gen, dtype=torch.float64)))
            norm = 1.2 * math.exp(0.15 * float(torch.randn((), generator=gen, dtype=torch.float64)))
            assert float(guard.check(step, torch.tensor(loss), torch.tensor(norm))) == 0
        return guard

    guard = noisy_guard()
    assert float(guard.check(60, torch.tensor(6.3 * 1.35), torch.tensor(1.3))) == 0  # alone: under k = 6
    assert not guard.drain()
    guard = noisy_guard()
    assert float(guard.check(60, torch.tensor(6.3 * 1.35), torch.tensor(3.7))) == 1  # with a 3x norm
    assert [e["kind"] for e in guard.drain()] == ["loss_spike"]
    guard = noisy_guard()  # a gradient norm alone, however large, is still only recorded
    assert float(guard.check(60, torch.tensor(6.4), torch.tensor(6.0))) == 0
    assert [e["kind"] for e in guard.drain()] == ["grad_spike"]
