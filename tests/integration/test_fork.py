"""`kiln fork` and `kiln runs`: the next attempt starts exactly where the parent was, with the
changes given, recorded, and refused with one line when they cannot carry the checkpoint."""

import json
import os
import time

import pytest
import torch

from kiln.cli import main
from kiln.runs.fork import create_fork
from kiln.runs.rundir import RunDir
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

STEPS = 16


class Crash(Exception):
    pass


class Watch(Callback):
    """Records the data batch of every step and the losses, and can crash the run at a step."""

    order = 99

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.crash_at = crash_at
        self.indices: list[int] = []
        self.first_params: dict[str, torch.Tensor] = {}
        self.fresh_optimizer_state: set[str] = set()

    def on_run_start(self, trainer):
        self.first_params = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
        states = {id(p) for opt in trainer.module.optimizers for p in opt.state}
        self.fresh_optimizer_state = {n for n, p in trainer.module.named_parameters() if id(p) not in states}

    def on_step_start(self, trainer, step, data_index):
        self.indices.append(data_index)

    def on_log(self, trainer, record):
        if record["step"] == self.crash_at:
            raise Crash(f"simulated crash at step {self.crash_at}")


def losses(run_path):
    return {r["step"]: r["loss"] for r in RunDir(run_path).metrics()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A parent run per precision (16 steps, checkpoints every 4) and the config maker."""
    from conftest import tiny_overrides, write_corpus

    from kiln.config import load_config

    root = tmp_path_factory.mktemp("fork")
    corpus = write_corpus(root / "corpus")
    runs = root / "runs"

    def cfg(*extra):
        return load_config(
            overrides=tiny_overrides(
                corpus, root / "cache", f"train.steps={STEPS}", "checkpoint.every=4", "eval.every=8", *extra
            )
        )

    start_run(cfg(), runs, "parent")
    return {"cfg": cfg, "runs": runs, "parent": runs / "parent"}


def fork_and_train(family, name, *, step=8, sets=(), skip=(), scratch=False, watch=None):
    fork = create_fork(family["parent"], name, step, list(sets), list(skip), scratch, log=lambda _: None)
    resume_run(fork.run.path, callbacks=[watch] if watch else [])
    return fork


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fork_without_change_continues_its_parent_bit_for_bit(family, precision):
    parent = family["parent"]
    if precision == "bf16":
        parent = family["runs"] / "parent-bf16"
        if not parent.exists():
            start_run(family["cfg"]("train.precision=bf16"), family["runs"], "parent-bf16")
    fork = create_fork(parent, f"same-{precision}", 8, log=lambda _: None)
    resume_run(fork.run.path)
    mine, theirs = losses(fork.run.path), losses(parent)
    assert sorted(mine) == list(range(9, STEPS + 1))
    assert all(mine[s] == theirs[s] for s in mine), [(s, mine[s], theirs[s]) for s in mine if mine[s] != theirs[s]]
    lineage = fork.run.lineage()
    assert lineage["parent"]["run"] == parent.name and lineage["parent"]["step"] == 8
    assert lineage["changes"] == [] and lineage["new_tensors"] == [] and lineage["skip_batches"] == []
    assert len(lineage["parent"]["checkpoint_sha256"]) == 64
    # the fork's copy of the checkpoint is the parent's, file for file
    ours = fork.run.checkpoints / "step-00000008" / "manifest.json"
    assert ours.read_bytes() == (parent / "checkpoints" / "step-00000008" / "manifest.json").read_bytes()
    assert fork.run.status()["state"] == "finished"


def test_fork_takes_the_newest_checkpoint_at_or_before_the_step_and_says_so(family):
    said = []
    fork = create_fork(family["parent"], "between", 10, log=said.append)
    assert fork.lineage["parent"]["step"] == 8 and fork.checkpoint.name == "step-00000008"
    assert any("at or before step 10" in line for line in said)


def test_fork_with_a_lower_lr_and_skipped_batches(family):
    watch = Watch()
    fork = fork_and_train(family, "lr-skip", sets=["optim.lr=0.0005"], skip=["10:12", "14:14"], watch=watch)
    lineage = fork.run.lineage()
    assert lineage["changes"] == ["optim.lr=0.0005"]
    assert lineage["changed"] == {"optim.lr": [family["cfg"]().optim.lr, 0.0005]}
    assert lineage["skip_batches"] == [[10, 12], [14, 14]]
    # steps 8.. train on data batches 8, 9, then 13, 15, 16, ...: the skipped ones never
    assert watch.indices == [8, 9, 13, 15, 16, 17, 18, 19]
    assert not {10, 11, 12, 14} & set(watch.indices)
    assert RunDir(fork.run.path).config().optim.lr == 0.0005
    saved = json.loads((fork.run.checkpoints / "step-00000016" / "state.json").read_text())
    assert saved["trainer"]["skipped"] == [[10, 12], [14, 14]]  # a resumed fork keeps skipping


def test_fork_adding_qk_norm_post_norm_and_z_loss_trains_and_resumes_exactly(family):
    sets = ["model.qk_norm=true", "model.post_norm=true", "train.z_loss=0.001"]
    watch = Watch()
    fork = fork_and_train(family, "stabilised", sets=sets, watch=watch)
    new = fork.run.lineage()["new_tensors"]
    assert new == sorted(
        [f"layers.{i}.attn.{n}_norm.weight" for i in range(2) for n in "qk"]  # RMSNorm per head
        + [f"layers.{i}.{n}_post_norm.{t}" for i in range(2) for n in ("attn", "mlp") for t in ("weight", "bias")]
    )  # the run's own norm: LayerNorm with bias
    # new gains start at 1 and biases at 0 (the documented initialisation), old weights are the
    # checkpoint's, and only the new tensors start without optimizer state
    for name in new:
        value = watch.first_params[name]
        assert torch.equal(value, torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value))
    parent_model = RunDir(family["parent"]).load_model(8, warn=lambda _: None).model.state_dict()
    assert torch.equal(watch.first_params["layers.0.attn.wq.weight"], parent_model["layers.0.attn.wq.weight"])
    assert watch.fresh_optimizer_state == set(new)
    records = RunDir(fork.run.path).metrics()
    assert all(r["z_loss"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] + 0.5  # trains (a fresh gain may cost a little at first)

    # the same fork killed after its own step-12 checkpoint and resumed: the same losses
    again = create_fork(family["parent"], "stabilised-again", 8, sets, log=lambda _: None)
    with pytest.raises(Crash):
        resume_run(again.run.path, callbacks=[Watch(crash_at=14)])
    assert again.run.status()["state"] == "failed"
    resume_run(again.run.path)
    assert losses(again.run.path) == losses(fork.run.path)
    assert RunDir(again.run.path).load_model().model.state_dict().keys() >= set(new)


def test_from_scratch_takes_any_change_and_keeps_the_data_order(family):
    watch = Watch()
    fork = fork_and_train(
        family, "wider", step=None, sets=["model.d_model=32", "train.steps=6"], scratch=True, watch=watch
    )
    lineage = fork.run.lineage()
    assert lineage["from_scratch"] and lineage["changed"]["model.d_model"] == [64, 32]
    assert watch.indices == list(range(6))
    assert sorted(losses(fork.run.path)) == list(range(1, 7))
    assert RunDir(fork.run.path).parent()[1] == 0


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing-run", "--step", "8", "--name", "x"], "not a Kiln run folder"),
        (["{parent}", "--step", "3", "--name", "x"], "no valid checkpoint at or before step 3"),
        (["{parent}", "--step", "8", "--name", "parent"], "already exists"),
        (["{parent}", "--step", "8", "--name", "x", "--set", "optim.lrr=1"], "did you mean 'optim.lr'"),
        (["{parent}", "--step", "8", "--name", "x", "--skip-batches", "9-12"], "--skip-batches takes A:B"),
        (["{parent}", "--step", "8", "--name", "x", "--skip-batches", "12:9"], "--skip-batches takes A:B"),
        (["{parent}", "--step", "8", "--name", "x", "--skip-batches", "3:9"], "before the fork point"),
        (["{parent}", "--step", "8", "--name", "x", "--set", "model.d_model=128"], "--from-scratch"),
        (["{parent}", "--step", "8", "--name", "x", "--set", "data.vocab_size=400"], "--from-scratch"),
        (["{parent}", "--step", "8", "--name", "x", "--set", "train.objective=masked"], "--from-scratch"),
        (["{parent}", "--step", "8", "--name", "x", "--set", "model.n_layers=3"], "--from-scratch"),
        (["{parent}", "--step", "8", "--name", "x", "--set", "model.n_heads=2"], "--from-scratch"),
        (["{parent}", "--step", "8", "--name", "x", "--set", "model.family=encoder"], "--from-scratch"),
        (
            ["{parent}", "--step", "8", "--name", "x", "--set", "data.tokenizer={parent}/tokenizer.json"],
            "--from-scratch",
        ),
        (["{parent}", "--name", "x"], "needs --step"),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(family, capsys, args, message):
    before = sorted(p.name for p in family["runs"].iterdir())
    parent_files = sorted(str(p) for p in family["parent"].rglob("*"))
    args = [a.format(parent=family["parent"]) for a in args]
    assert main(["fork", *args, "--no-train"]) == 2
    assert message in _error_line(capsys)
    assert sorted(p.name for p in family["runs"].iterdir()) == before
    assert sorted(str(p) for p in family["parent"].rglob("*")) == parent_files


@pytest.mark.parametrize(
    "args, message",
    [
        (["fork", "{parent}", "--step", "abc", "--name", "x"], "kiln fork: error: argument --step: invalid int value"),
        (["fork", "{parent}", "--step", "8"], "kiln fork: error: the following arguments are required: --name"),
        (["compare", "{parent}", "{parent}", "--bogus"], "kiln: error: unrecognized arguments: --bogus"),
    ],
)
def test_usage_mistakes_are_one_line_too(family, capsys, args, message):
    before = sorted(p.name for p in family["runs"].iterdir())
    assert main([a.format(parent=family["parent"]) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message) and err[0].endswith("--help)"), err
    assert sorted(p.name for p in family["runs"].iterdir()) == before


def test_resume_refuses_a_fork_only_change_with_a_hint(family, capsys):
    assert main(["train", "--resume", str(family["parent"]), "--set", "model.qk_norm=true"]) == 2
    assert "kiln fork" in _error_line(capsys)


def test_no_train_then_train_resume(family, capsys):
    assert main(["fork", str(family["parent"]), "--step", "12", "--name", "later", "--no-train"]) == 0
    run = RunDir(family["runs"] / "later")
    assert run.status()["state"] == "created" and not run.metrics()
    assert main(["train", "--resume", str(run.path)]) == 0
    assert sorted(losses(run.path)) == list(range(13, STEPS + 1))


def test_runs_lists_status_lineage_and_tree(family, capsys):
    runs = family["runs"]
    fork_and_train(family, "grandchild-parent", sets=["optim.lr=0.001"])
    grand = create_fork(runs / "grandchild-parent", "grandchild", 12, log=lambda _: None)
    # a run whose process was killed (its pid is gone) and one that is alive (this process)
    dead = create_fork(family["parent"], "killed", 8, log=lambda _: None)
    dead.run.write_json(
        "status.json",
        {
            "state": "running",
            "pid": 2**22 + 12345,
            "host": os.uname().nodename,
            "heartbeat": time.time(),
            "active_s": 3.0,
        },
    )
    from kiln.runfolder.status import running_record

    alive = create_fork(family["parent"], "alive", 8, log=lambda _: None)
    alive.run.write_json("status.json", {**running_record(8, time.time()), "active_s": 1.0})

    assert main(["runs", str(runs), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["parent"]["status"] == "finished" and rows["parent"]["steps"] == STEPS
    assert rows["parent"]["best_val_loss"] == min(e["val_loss"] for e in RunDir(family["parent"]).evals())
    assert rows["killed"]["status"] == "interrupted"
    assert rows["alive"]["status"] == "running"
    assert rows["grandchild"]["status"] == "created"
    assert rows["grandchild"]["parent"] == "grandchild-parent" and rows["grandchild"]["fork_step"] == 12
    assert rows["grandchild-parent"]["parent"] == "parent" and rows["grandchild-parent"]["fork_step"] == 8
    assert rows["grandchild-parent"]["tokens"] == RunDir(runs / "grandchild-parent").metrics()[-1]["tokens"]

    assert main(["runs", str(runs), "--tree"]) == 0
    tree = capsys.readouterr().out.splitlines()
    top = [line for line in tree if not line.startswith((" ", "│", "├", "└"))]
    assert any(line.startswith("parent  [finished") for line in top)
    child = next(i for i, line in enumerate(tree) if "grandchild-parent (from step 8)" in line)
    assert "grandchild (from step 12)" in tree[child + 1] and tree[child + 1].startswith(("│  ", "   "))

    assert main(["runs", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "grandchild-parent@12" in table and "interrupted" in table and "parent@8" in table
    assert [(r.name, at) for r, at in RunDir(grand.run.path).ancestry()] == [("parent", 8), ("grandchild-parent", 12)]


def test_a_fork_of_a_fork_at_its_fork_point_inherits_the_new_tensors(family):
    first = create_fork(family["parent"], "qk-first", 8, ["model.qk_norm=true"], log=lambda _: None)
    second = create_fork(first.run.path, "qk-second", 8, log=lambda _: None)  # the linked step-8 checkpoint
    assert second.lineage["new_tensors"] == first.lineage["new_tensors"] != []
    resume_run(second.run.path)
    assert sorted(losses(second.run.path)) == list(range(9, STEPS + 1))


def test_compare_and_report_verbs(family, tmp_path, capsys):
    fork = create_fork(family["parent"], "for-compare", 8, ["optim.lr=0.0007"], log=lambda _: None)
    resume_run(fork.run.path)
    out = tmp_path / "cmp"
    assert main(["compare", str(family["parent"]), str(fork.run.path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "optim.lr" in printed and "parent@8" in printed
    assert (out / "compare.png").is_file() and "optim.lr" in (out / "compare.md").read_text()
    assert main(["report", str(fork.run.path)]) == 0
    report = fork.run.path / "report"
    assert (report / "report.html").is_file() and "Lineage" in (report / "report.md").read_text()
    assert main(["compare", str(family["parent"]), str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "not a Kiln run" in _error_line(capsys) and not (tmp_path / "x").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_fork_into_another_folder_with_dropout(family, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    assert (
        main(
            [
                "fork",
                str(family["parent"]),
                "--step",
                "12",
                "--name",
                "drop",
                "--runs-dir",
                str(other),
                "--set",
                "model.dropout=0.1",
                "--no-train",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in family["runs"].iterdir() if p.name == "drop") == []
    run = RunDir(other / "drop")
    assert run.lineage()["changed"]["model.dropout"] == [0.0, 0.1] and run.config().model.dropout == 0.1
    assert main(["train", "--resume", str(run.path)]) == 0
    forked = losses(run.path)
    assert sorted(forked) == list(range(13, STEPS + 1))
    assert forked[13] != losses(family["parent"])[13]  # dropout is on: the same batch, another loss
    capsys.readouterr()
    assert main(["runs", str(other), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["name"] == "drop" and row["parent"] == "parent" and row["status"] == "finished"


def test_a_corrupt_newest_checkpoint_is_passed_over_and_named(family, tmp_path):
    import shutil

    copy = tmp_path / "runs" / "parent"
    shutil.copytree(family["parent"], copy)  # a real copy: the family's checkpoints stay intact
    newest = RunDir(copy).checkpoints / "step-00000012"
    victim = next(f for f in sorted(newest.iterdir()) if f.suffix == ".safetensors")
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 1
    victim.write_bytes(bytes(raw))
    said: list[str] = []
    fork = create_fork(copy, "past-corrupt", 12, log=said.append)
    assert fork.lineage["parent"]["step"] == 8 and fork.checkpoint.name == "step-00000008"
    text = "\n".join(said)
    assert (
        "step-00000012 is unusable" in text
        and "step-00000008 (the newest valid checkpoint at or before step 12)" in text
    )
    resume_run(fork.run.path)
    assert losses(fork.run.path) == {k: v for k, v in losses(family["parent"]).items() if k > 8}


def test_kiln_runs_tells_a_killed_training_from_a_live_one(family, tmp_path, capsys):
    """A real process, killed with SIGKILL mid-run: its status.json still says running, and
    `kiln runs` reports it interrupted once its pid is gone."""
    import signal
    import subprocess
    import sys

    cfg = family["cfg"]("train.steps=100000", "checkpoint.every=0", "eval.every=0")
    runs = tmp_path / "runs"
    config = tmp_path / "long.toml"
    from kiln.config import to_toml

    config.write_text(to_toml(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", "train", "--config", str(config), "--runs-dir", str(runs), "--name", "long"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            state = RunDir(runs / "long").status() if (runs / "long" / "status.json").is_file() else {}
            if state.get("state") == "running" and state.get("pid") == proc.pid:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the training never reported itself running")
        capsys.readouterr()
        assert main(["runs", str(runs), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (
        json.loads((runs / "long" / "status.json").read_text())["state"] == "running"
    )  # as the killed process left it
    assert main(["runs", str(runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "interrupted"
