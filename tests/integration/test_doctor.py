"""`kiln doctor`: real tiny runs with faults injected (`[faults]`, and a callback for growing
gradients), plus fabricated files where a real run would be slow or needs several processes
(hang dumps, damaged checkpoints, a swapped tokenizer, per-rank step times, an activation blow-up,
evaluations) -> the right finding, with evidence and a `kiln fork` remedy that `kiln fork`
accepts; a clean run -> nothing worth a warning. One remedy is carried out end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_corpus

from kiln.cli import build_parser
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.runs.doctor import diagnose, findings_json, format_findings, remedy_argv
from kiln.runs.fork import create_fork, plan_fork
from kiln.runs.rundir import RunDir
from kiln.train import checkpoint as ckpt
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run


# ----------------------------------------------------------------------------- a fault [faults] lacks
class GrowGrads(Callback):
    """Gradients x rate^(steps since start): the logged norm grows, AdamW's update barely changes."""

    def __init__(self, start, rate):
        super().__init__()
        self.start, self.rate = start, rate

    def on_after_backward(self, trainer, step):
        if step + 1 >= self.start:
            for p in trainer.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.rate ** (step + 1 - self.start))


# ----------------------------------------------------------------------------- runs
BASE = [
    'callbacks.enabled=["layer_stats", "step_time"]',
    "callbacks.layer_stats.every=5",
    "eval.every=20",
    "checkpoint.every=20",
    "schedule.warmup_steps=10",
]

RUNS = {  # name: (steps, extra overrides: mostly [faults], callbacks)
    "clean": (120, [], lambda: []),
    "clean_seed1": (120, ["train.seed=1"], lambda: []),
    "clean_seed2": (120, ["train.seed=2"], lambda: []),
    "wrecked": (120, ["optim.lr=0.3"], lambda: []),  # 100x the preset's LR from the first step
    "nan": (80, ["faults.nonfinite_loss=[50]"], lambda: []),
    "spike": (100, ["guard.on_spike=ignore", "faults.corrupt_batch=[70, 71]"], lambda: []),
    "guarded_spike": (100, ["faults.corrupt_batch=[70]"], lambda: []),
    "diverge": (80, ["guard.enabled=false", "faults.lr_high=31", "faults.lr_high_factor=1000"], lambda: []),
    "plateau": (100, ["faults.lr_low=21", "faults.lr_low_factor=0.001"], lambda: []),
    "grads": (100, ["guard.on_grad_spike=ignore"], lambda: [GrowGrads(21, 1.05)]),
    "collapse": (100, ["faults.entropy_collapse=41", "faults.layer=0"], lambda: []),
    "dead": (100, ["faults.dead_units=41", "faults.layer=1", "faults.dead_fraction=0.6"], lambda: []),
    "overfit": (100, ["eval.every=10", "checkpoint.every=10", "faults.repeat_batch=21"], lambda: []),
    "slow": (
        60,
        ["faults.slow_steps=[30]", "faults.slow_s=0.6", "faults.loader_stall=[45]", "faults.stall_s=0.6"],
        lambda: [],
    ),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    corpus = write_corpus(root / "corpus")
    runs = root / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (steps, extra, callbacks) in RUNS.items():
            cfg = load_config(overrides=tiny_overrides(corpus, root / "cache", f"train.steps={steps}", *BASE, *extra))
            start_run(cfg, runs, name, callbacks=callbacks())
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "runs": runs, "corpus": corpus}


def copy_run(lab, name, new):
    """A copy of run `name` to damage (the copy's checkpoints are real files, not links)."""
    target = lab["runs"] / new
    shutil.copytree(lab["runs"] / name, target)
    return target


def only(findings, kind):
    found = [f for f in findings if f["kind"] == kind]
    assert len(found) == 1, (kind, [(f["kind"], f["severity"], f["summary"]) for f in findings])
    return found[0]


def check_fork_remedy(run: Path, f, before: int):
    """The remedy parses as `kiln fork`, starts from a valid checkpoint <= `before`, and `kiln
    fork` would accept it (checked without writing anything)."""
    remedy = f["remedy"]
    assert remedy is not None, f
    argv = remedy["argv"]
    assert argv[0] == "fork" and remedy["command"].startswith("kiln fork ")
    args = build_parser().parse_args(argv)
    assert Path(args.run) == run
    assert args.name.startswith(f"{run.name}-")
    if not args.from_scratch:
        assert args.step <= before
        assert ckpt.verify_checkpoint(run / "checkpoints" / ckpt.step_dir_name(args.step)) is None
    plan_fork(
        Path(args.run), args.name, args.step, args.overrides, args.skip_batches, args.from_scratch, log=lambda _: None
    )
    return args


def sets(args) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.overrides)


# ----------------------------------------------------------------------------- clean
@pytest.mark.parametrize("name", ["clean", "clean_seed1", "clean_seed2"])
def test_a_clean_run_has_nothing_to_warn_about(lab, name):
    findings = diagnose(lab["runs"] / name)
    assert [f for f in findings if f["severity"] != "info"] == [], format_findings(findings, explain=True)
    assert "no problems found" in format_findings([]) and findings_json([]) == []


def test_a_run_that_learned_nothing_is_critical_and_a_fresh_attempt_at_a_lower_lr_learns(lab):
    """LR 0.3 from the first step: the loss rises during warm-up, then settles at the unigram
    entropy (token frequencies only). Critical; the remedy starts afresh at a sane LR and, trained
    as long, ends far below the baseline."""
    run = lab["runs"] / "wrecked"
    findings = diagnose(run)
    f = only(findings, "no_learning")
    assert f["severity"] == "critical" and findings[0] is f, format_findings(findings, explain=True)
    ev = f["evidence"]
    assert ev["of_entropy"] >= 0.92 and ev["warmup_peak_loss"] > ev["start_loss"] + 0.25
    args = check_fork_remedy(run, f, 0)
    assert args.from_scratch and float(sets(args)["optim.lr"]) <= 0.0034
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fork = create_fork(Path(args.run), args.name, None, args.overrides, args.skip_batches, True, log=lambda _: None)
        summary = resume_run(fork.run.path)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 120 and summary["val_loss"] < 0.85 * summary["unigram_entropy"]
    assert not [g for g in diagnose(fork.run.path) if g["severity"] == "critical"]


# ----------------------------------------------------------------------------- the loss
def test_a_nan_loss_the_guard_skipped_is_a_nonfinite_warning_with_a_fork_skipping_its_batch(lab):
    run = lab["runs"] / "nan"
    f = only(diagnose(run), "nonfinite")
    event = next(e for e in RunDir(run).events() if e["kind"] == "nonfinite")
    assert f["severity"] == "warning" and f["steps"] == [50, 50]
    assert f["evidence"]["data_indices"] == [event["data_index"]] and f["evidence"]["guard_actions"] == ["skip"]
    args = check_fork_remedy(run, f, 49)
    assert args.step == 40 and args.skip_batches == [f"{event['data_index']}:{event['data_index']}"]
    assert float(sets(args)["optim.lr"]) < 1e-3
    assert sets(args)["faults.nonfinite_loss"] == "[]"  # the fork tests the fix, not the fault again


@pytest.mark.parametrize("name, action", [("spike", "none"), ("guarded_spike", "skip")])
def test_a_loss_spike_from_corrupt_batches_gets_palms_remedy(lab, name, action):
    """Seen in the logged losses alone (guard.on_spike = ignore), or through the guard's event."""
    run = lab["runs"] / name
    findings = diagnose(run)
    f = only(findings, "loss_spike")
    assert f["severity"] == "warning" and f["steps"][0] == 70 and f["steps"][1] <= 71
    assert f["evidence"]["jump"] > 1.3 and 69 in f["evidence"]["data_indices"]
    assert f["evidence"]["guard_actions"] == [action]
    args = check_fork_remedy(run, f, 69)
    assert args.step == 60
    lo, hi = map(int, args.skip_batches[0].split(":"))
    assert lo <= 69 and hi >= 70 and hi - lo <= 6
    assert findings[0] is f


def test_guard_events_handled_spikes_are_info_repeated_ones_a_warning_a_stop_a_divergence(lab):
    run = copy_run(lab, "clean", "guarded")
    rd = RunDir(run)
    spike = {"kind": "loss_spike", "loss": 9.0, "grad_norm": 2.0, "action": "rollback"}
    rd.log_event({"step": 55, **spike, "data_index": 54})
    rd.log_event(
        {"step": 40, "kind": "rollback", "from_step": 55, "checkpoint": "step-00000040", "batches_skipped": [40, 54]}
    )
    f = only(diagnose(run), "loss_spike")
    assert f["severity"] == "info" and f["remedy"] is None and f["evidence"]["data_indices"] == [54]
    for step in (70, 85):
        rd.log_event({"step": step, **spike, "data_index": step + 14})
    f = only(diagnose(run), "loss_spike")
    assert f["severity"] == "warning" and f["evidence"]["count"] == 3
    check_fork_remedy(run, f, 54)
    rd.log_event({"step": 95, **spike, "data_index": 109, "action": "stop"})
    rd.write_json("status.json", {"state": "stopped", "step": 95, "reason": "the training guard stopped the run"})
    findings = diagnose(run)
    f = only(findings, "divergence")
    assert f["severity"] == "critical" and f["evidence"]["interventions"] == 4
    assert not [g for g in findings if g["kind"] == "loss_spike"]
    check_fork_remedy(run, f, 54)


def test_divergence_from_a_far_too_high_lr_and_its_remedy_trains(lab):
    """End to end: the doctor sees the divergence, proposes a fork with a lower LR, and the fork trains."""
    run = lab["runs"] / "diverge"
    findings = diagnose(run)
    f = only(findings, "divergence")
    assert f["severity"] == "critical" and findings[0] is f
    assert 30 <= f["steps"][0] <= 36 and f["evidence"]["effective_peak_lr"] > 0.05
    args = check_fork_remedy(run, f, 31)
    assert args.step == 20 and float(sets(args)["optim.lr"]) < 1e-3
    assert remedy_argv(findings, 1) == f["remedy"]["argv"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fork = create_fork(
            Path(args.run),
            args.name,
            args.step,
            args.overrides,
            args.skip_batches,
            args.from_scratch,
            log=lambda _: None,
        )
        resume_run(fork.run.path)
    finally:
        torch.set_num_threads(threads)
    parent, child = RunDir(run).metrics(), RunDir(fork.run.path).metrics()
    assert child[-1]["step"] == 80
    tail = lambda rows: sorted(r["loss"] for r in rows[-10:])[5]  # noqa: E731
    assert tail(child) < tail(parent) - 1.0
    assert not [g for g in diagnose(fork.run.path) if g["kind"] == "divergence"]


def test_a_plateau_under_a_tiny_lr_is_found_and_the_fork_raises_the_lr(lab):
    run = lab["runs"] / "plateau"
    findings = diagnose(run)
    f = only(findings, "plateau")
    assert f["severity"] == "warning" and f["steps"][0] == 21
    assert f["evidence"]["loss_drop"] < 0.03 and f["evidence"]["lr"] < 1e-5
    args = check_fork_remedy(run, f, 21)
    assert args.step == 20 and float(sets(args)["optim.lr"]) >= 1e-3
    assert not [g for g in findings if g["severity"] == "critical"]


def test_growing_gradient_norms_are_a_warning(lab):
    run = lab["runs"] / "grads"
    findings = diagnose(run)
    f = only(findings, "grad_growth")
    assert f["severity"] == "warning" and f["evidence"]["trend_growth"] > 4
    check_fork_remedy(run, f, f["evidence"]["doubled_at_step"])
    assert not [g for g in findings if g["severity"] == "critical"]


# ----------------------------------------------------------------------------- layers
def test_an_attention_entropy_collapse_names_the_layer_and_proposes_qk_norm(lab):
    run = lab["runs"] / "collapse"
    findings = diagnose(run)
    f = only(findings, "entropy_collapse")
    assert f["evidence"]["module"] == "layers.0.attn" and f["evidence"]["attn_entropy"] < 0.5
    assert 40 <= f["steps"][0] <= 45
    args = check_fork_remedy(run, f, 40)
    assert sets(args)["model.qk_norm"] == "true"
    logits = only(findings, "attention_logit_blowup")
    assert logits["evidence"]["module"] == "layers.0.attn"


def test_dead_units_in_one_mlp(lab):
    run = lab["runs"] / "dead"
    findings = diagnose(run)
    f = only(findings, "dead_units")
    assert f["evidence"]["module"] == "layers.1.mlp" and f["evidence"]["dead_frac"] >= 0.5
    assert f["steps"][0] == 45 and findings[0] is f
    assert "rarely recover" in f["remedy"]["why"]
    args = check_fork_remedy(run, f, 44)
    assert args.step == 40 and float(sets(args)["optim.lr"]) < 1e-3


def test_an_activation_blowup_in_one_layer(lab):
    """Fabricated over a clean run: one MLP's output RMS doubles every 5 steps from step 60."""
    run = copy_run(lab, "clean", "layers")
    path = run / "layer_stats.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if r["module"] == "layers.1.mlp" and r["step"] > 60:
            r["act_rms"] *= 2.0 ** ((r["step"] - 60) / 5)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = only(diagnose(run), "activation_blowup")
    assert f["evidence"]["module"] == "layers.1.mlp" and f["evidence"]["stat"] == "act_rms"
    assert f["evidence"]["ratio_to_peers"] >= 10 and 60 < f["steps"][0] <= 75
    args = check_fork_remedy(run, f, f["steps"][0] - 1)
    assert "train.z_loss" in sets(args) and float(sets(args)["optim.lr"]) < 1e-3


# ----------------------------------------------------------------------------- evaluations
def test_repeated_data_is_overfitting_and_the_fork_goes_back_before_it(lab):
    run = lab["runs"] / "overfit"  # from step 21 on, every step trains on the same batch
    findings = diagnose(run)
    f = only(findings, "overfitting")
    assert f["severity"] == "warning" and findings[0] is f
    assert f["evidence"]["train_loss_at_last"] < 0.6 * f["evidence"]["last_val_loss"]
    args = check_fork_remedy(run, f, 30)
    assert args.step == f["evidence"]["fork_step"] <= 30 and "model.dropout" in sets(args)


def test_an_evaluation_regression_and_a_suite_drop(lab):
    run = copy_run(lab, "clean", "evals")
    path = run / "eval.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r, acc in zip(rows, (0.20, 0.25, 0.30, 0.31, 0.18, 0.33)):
        r["lm/acc"] = acc
        if r["step"] == 80:
            r["val_loss"] = rows[2]["val_loss"] + 0.4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = [f for f in diagnose(run) if f["kind"] == "eval_regression"]
    by_metric = {f["evidence"]["metric"]: f for f in found}
    assert set(by_metric) == {"val_loss", "lm/acc"}
    assert by_metric["val_loss"]["steps"] == [60, 80] and by_metric["val_loss"]["severity"] == "warning"
    assert check_fork_remedy(run, by_metric["val_loss"], 60).step == 60
    assert by_metric["lm/acc"]["steps"] == [80, 100] and by_metric["lm/acc"]["remedy"] is None


# ----------------------------------------------------------------------------- time and infrastructure
def test_slow_steps_and_a_loader_stall_are_told_apart(lab):
    findings = diagnose(lab["runs"] / "slow")
    slow, stall = only(findings, "slow_steps"), only(findings, "loader_stall")
    assert slow["evidence"]["at_steps"] == [30] and slow["remedy"] is None and slow["severity"] == "info"
    assert slow["evidence"]["phases"] == ["grad_norm"]  # the fault sleeps after the backward pass
    assert stall["evidence"]["at_steps"] == [45] and stall["evidence"]["data_s"][0] > 0.5


def test_a_slow_rank_is_named(lab):
    run = copy_run(lab, "clean", "ranks")
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        base = 0.01 * (1 + 0.1 * math.sin(i))
        r.update(
            {
                "step_time/rank0_busy_s": base,
                "step_time/rank1_busy_s": base * 1.02,
                "step_time/rank2_busy_s": base * 1.8,
                "step_time/rank3_busy_s": base * 0.98,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = only(diagnose(run), "slow_rank")
    assert f["evidence"]["rank"] == 2 and f["evidence"]["ratio_to_others"] > 1.5


def test_a_hang_names_its_ranks_and_resumes(lab):
    run = copy_run(lab, "clean", "hung")
    stack = (
        "a training step running for 612s (limit 600s); Python stacks of every thread:\n"
        "Thread 0x00007f01 (most recent call first):\n"
        '  File "/x/kiln/train/watchdog.py", line 70 in _dump_and_exit\n'
        '  File "/x/kiln/train/watchdog.py", line 66 in _watch\n\n'
        "Current thread 0x00007f00 (most recent call first):\n"
        '  File "/x/torch/distributed/c10d.py", line 2500 in all_reduce\n'
        '  File "/x/kiln/train/module.py", line 170 in forward_backward\n'
        '  File "/x/kiln/train/trainer.py", line 160 in train_step\n'
        '  File "/x/kiln/__main__.py", line 3 in <module>\n'
    )
    for rank in (0, 3):
        (run / f"hang-rank{rank}.txt").write_text(stack)
    rd = RunDir(run)
    rd.write_json("status.json", {"state": "failed", "step": 87, "reason": "exit 75"})
    findings = diagnose(run)
    f = only(findings, "hang")
    assert f["severity"] == "critical" and f["evidence"]["ranks"] == [0, 3]
    assert f["evidence"]["last_step"] >= 87 and "all_reduce" in f["evidence"]["stuck_in"][0]
    assert f["remedy"]["argv"] == ["train", "--resume", str(run)]
    rd.write_json("status.json", {"state": "finished", "step": 120})
    assert only(diagnose(run), "hang")["severity"] == "info"


def test_a_corrupt_checkpoint_is_critical_with_the_previous_valid_one(lab):
    run = copy_run(lab, "clean", "damaged")
    for step in (80, 120):
        target = run / "checkpoints" / ckpt.step_dir_name(step) / "model.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    found = sorted((f for f in diagnose(run) if f["kind"] == "corrupt_checkpoint"), key=lambda f: f["steps"][0])
    assert [f["steps"] for f in found] == [[80, 80], [120, 120]]
    assert all(f["severity"] == "critical" for f in found)
    assert found[0]["evidence"]["previous_valid"] == "step-00000060"
    assert check_fork_remedy(run, found[0], 79).step == 60
    assert found[1]["evidence"]["previous_valid"] == "step-00000100"
    RunDir(run).write_json("status.json", {"state": "interrupted", "step": 120})
    last = next(f for f in diagnose(run) if f["kind"] == "corrupt_checkpoint" and f["steps"][0] == 120)
    assert last["remedy"]["argv"][:2] == ["train", "--resume"]


def test_a_tokenizer_that_does_not_fit_the_dataset_is_critical(lab):
    run = copy_run(lab, "clean", "swapped")
    data = json.loads((run / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    ids = sorted(vocab.values())
    data["model"]["vocab"] = {tok: ids[len(ids) - 1 - ids.index(i)] for tok, i in vocab.items()}
    (run / "tokenizer.json").write_text(json.dumps(data))
    findings = diagnose(run)
    f = only(findings, "tokenizer_mismatch")
    assert f["severity"] == "critical" and f["remedy"]["argv"][0] == "cp"
    k = findings.index(f) + 1
    with pytest.raises(KilnError, match="not a kiln command"):
        remedy_argv(findings, k)
    shutil.copy(f["remedy"]["argv"][1], f["remedy"]["argv"][2])  # the fix works
    assert not [g for g in diagnose(run) if g["kind"] == "tokenizer_mismatch"]


# ----------------------------------------------------------------------------- output
def test_ranking_text_json_and_apply(lab):
    findings = diagnose(lab["runs"] / "diverge") + diagnose(lab["runs"] / "slow")
    from kiln.runs.doctor import rank

    findings = rank(findings)
    order = {"critical": 0, "warning": 1, "info": 2}
    assert [order[f["severity"]] for f in findings] == sorted(order[f["severity"]] for f in findings)
    text = format_findings(findings, explain=True)
    assert "1. CRITICAL divergence" in text and "fix: kiln fork" in text and "evidence:" in text
    out = json.loads(json.dumps(findings_json(findings), allow_nan=False))
    assert set(out[0]) == {"kind", "severity", "steps", "evidence", "remedy"}
    assert out[0]["remedy"].startswith("kiln fork")
    no_remedy = next(i for i, f in enumerate(findings, 1) if f["remedy"] is None)
    for bad in (0, len(findings) + 1, no_remedy):
        with pytest.raises(KilnError):
            remedy_argv(findings, bad)
    with pytest.raises(KilnError, match="nothing"):
        remedy_argv([], 1)


def test_fail_on_sets_the_exit_code_for_scripts(lab, capsys):
    from kiln.cli import main

    diverged, clean = str(lab["runs"] / "diverge"), str(lab["runs"] / "clean")
    assert main(["doctor", diverged]) == 0  # reading a report is not a failure unless asked
    assert main(["doctor", diverged, "--fail-on", "critical"]) == 1
    assert main(["doctor", diverged, "--json", "--fail-on", "warning"]) == 1
    assert main(["doctor", clean, "--fail-on", "warning"]) == 0  # info findings at most
    assert main(["doctor", diverged, "--apply", "1", "--fail-on", "critical"]) == 2  # one or the other
    capsys.readouterr()


def test_runs_with_little_to_read_have_nothing_to_report(lab):
    fork = create_fork(lab["runs"] / "clean", "clean-untrained", 60, log=lambda _: None)  # kiln fork --no-train
    assert diagnose(fork.run.path) == []
    cfg = load_config(overrides=tiny_overrides(lab["corpus"], lab["root"] / "cache"))
    bare = RunDir.create(lab["root"] / "elsewhere", "bare", cfg)  # created, never started
    assert diagnose(bare.path) == []


def test_the_doctor_reads_run_folders_without_the_trainer(lab):
    code = (
        "import sys; from kiln.runs.doctor import diagnose; diagnose(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m in ('kiln.train.trainer', 'kiln.train.session', "
        "'kiln.train.build', 'kiln.train.module')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(lab["runs"] / "nan")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
