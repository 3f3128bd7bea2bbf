"""Muon and per-group optimizers end to end: a run learns, records and prints its groups, resumes
bit for bit, vetoes an update on the device, and refuses a resume or fork that would change
which state each parameter's optimizer keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_corpus
from test_resume import Crash, CrashAt

from kiln.cli import main
from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12
MUON = ["optim.name=muon", "model.tie_embeddings=false", f"train.steps={STEPS}", "checkpoint.every=4"]


class Veto(Callback):
    """Discards step 3's update through the device flag, and keeps the weights around it."""

    def __init__(self):
        super().__init__()
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def before_optimizer_step(self, trainer, step):
        if step == 3:
            self.before = {k: v.detach().clone() for k, v in trainer.module.parts[0].state_dict().items()}
            return torch.ones((), device=trainer.device)
        return None

    def on_optimizer_step(self, trainer, step, discard):
        if step == 3:
            self.after = {k: v.detach().clone() for k, v in trainer.module.parts[0].state_dict().items()}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon")
    corpus = write_corpus(root / "corpus")

    def cfg(*more: str):
        return load_config("tiny", overrides=tiny_overrides(corpus, root / "cache", *MUON, *more))

    start_run(cfg(), root / "runs", "full")
    return root, cfg


def test_a_muon_run_learns_and_records_its_groups(setup, capsys):
    root, _ = setup
    run = root / "runs" / "full"
    got = losses(run)
    assert len(got) == STEPS and got[-1] < got[0] - 0.5
    groups = {g["name"]: g for g in json.loads((run / "optimizer_groups.json").read_text())}
    assert groups["hidden"]["optimizer"] == "muon" and groups["head"]["names"] == ["head.weight"]
    assert groups["norm_bias"]["optimizer"] == groups["embedding"]["optimizer"] == "adamw"
    from safetensors.torch import load_file

    saved = load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    assert sum(g["parameters"] for g in groups.values()) == sum(t.numel() for t in saved.values())
    assert sorted(n for g in groups.values() for n in g["names"]) == sorted(saved)  # each in one group


def test_a_muon_run_resumes_exactly(setup):
    root, cfg = setup
    with pytest.raises(Crash):
        start_run(cfg(), root / "runs", "cut", callbacks=[CrashAt(6)])
    resume_run(root / "runs" / "cut")
    assert losses(root / "runs" / "cut") == losses(root / "runs" / "full")  # from step 4's checkpoint, bit for bit


def test_a_vetoed_update_leaves_the_weights_as_they_were(setup):
    root, cfg = setup
    veto = Veto()
    start_run(cfg("train.steps=4"), root / "runs", "veto", callbacks=[veto])
    assert veto.before and all(torch.equal(veto.before[k], veto.after[k]) for k in veto.before)


def test_resume_and_fork_keep_each_groups_optimizer(setup, capsys):
    root, _ = setup
    parent = root / "runs" / "full"
    with pytest.raises(ConfigError, match="changes the optimizer and its state"):
        resume_run(parent, overrides=["optim.name=adamw"])
    assert main(["fork", str(parent), "--step", "8", "--name", "slower", "--set", "optim.muon_lr=0.01"]) == 0
    assert main(["fork", str(parent), "--step", "8", "--name", "adam", "--set", "optim.name=adamw"]) == 2
    assert "changes the optimizer and its state" in capsys.readouterr().err
    assert not (root / "runs" / "adam").exists()


def test_a_mup_run_prints_its_width_factor_and_resumes_exactly(setup, capsys):
    """µP at twice its base width, with AdamW: the hidden matrices' LR is halved (printed), and a
    run cut after its step-4 checkpoint resumes bit for bit."""
    root, cfg = setup
    mup = ["optim.name=adamw", "model.parametrization=mup", "model.mup_base_width=32", "model.tie_embeddings=true"]
    start_run(cfg(*mup), root / "runs", "mup-full")
    with pytest.raises(Crash):
        start_run(cfg(*mup), root / "runs", "mup-cut", callbacks=[CrashAt(6)])
    resume_run(root / "runs" / "mup-cut")
    assert losses(root / "runs" / "mup-cut") == losses(root / "runs" / "mup-full")
    groups = {g["name"]: g for g in json.loads((root / "runs" / "mup-full" / "optimizer_groups.json").read_text())}
    assert groups["hidden"]["hidden_lr"] == pytest.approx(groups["hidden"]["lr"] / 2)
