"""Bad input never loses data and always gets one clear line: exit code 2, no traceback, and
nothing that existed before is changed."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch
from reliability_helpers import read_jsonl, tiny, tiny_overrides, write_corpus  # noqa: F401

from kiln.cli import main
from kiln.errors import KilnError


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to show nothing changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kiln: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_QUIET", "1")
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    corpus = write_corpus(tmp_path / "corpus", docs=12)
    base = tiny_overrides(tmp_path, corpus) + ["train.steps=6", "checkpoint.every=3"]
    return tmp_path, corpus, base


def test_empty_corpus(env, capsys):
    root, _, base = env
    empty = root / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("   \n\n")
    code, err = run_cli(["prepare", "--preset", "tiny", *sets(base + [f"data.corpus={empty}"])], capsys)
    assert_one_line_error(code, err, "holds no text")


def test_binary_and_non_utf8_files_are_skipped_with_a_count(env, capsys):
    root, corpus, base = env
    (corpus / "blob.txt").write_bytes(bytes(range(256)) * 10)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert main(["prepare", "--preset", "tiny", *sets(base)]) == 0
    assert "skipped 2 file(s) that are not UTF-8 text" in capsys.readouterr().out


def test_only_binary_files_is_an_error(env, capsys):
    root, _, base = env
    bad = root / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"\x00\x01\x02" * 100)
    code, err = run_cli(["prepare", "--preset", "tiny", *sets(base + [f"data.corpus={bad}"])], capsys)
    assert_one_line_error(code, err, "holds no text", "1 binary or non-UTF-8 file(s) skipped")


def test_huge_single_line(env, capsys):
    root, corpus, base = env
    (corpus / "huge.txt").write_text("word " * 600_000)  # 3 MB on one line
    assert main(["prepare", "--preset", "tiny", *sets(base)]) == 0


def test_missing_path(env, capsys):
    root, _, base = env
    code, err = run_cli(["prepare", "--preset", "tiny", *sets(base + [f"data.corpus={root / 'nope'}"])], capsys)
    assert_one_line_error(code, err, "nope", "neither a registered corpus")


def test_tokenizer_that_does_not_match_the_shards(env, capsys):
    from kiln.config import load_config
    from kiln.data.shards import prepare
    from kiln.data.tokenizer import train_tokenizer

    root, corpus, base = env
    data = prepare(load_config("tiny", overrides=base).data)
    before = snapshot(data.path)
    other = train_tokenizer(["something else entirely"] * 50, 280)
    (data.path / "tokenizer.json").write_text(other.to_json())
    code, err = run_cli(["prepare", "--preset", "tiny", *sets(base)], capsys)
    assert_one_line_error(code, err, "does not match the tokenizer the shards were made with")
    after = snapshot(data.path)
    assert {k: v for k, v in after.items() if k != "tokenizer.json"} == {
        k: v for k, v in before.items() if k != "tokenizer.json"
    }  # the shards were not rewritten


def test_incompatible_config_change_on_resume(env, capsys):
    root, _, base = env
    runs = root / "runs"
    assert main(["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", "r", *sets(base)]) == 0
    before = snapshot(runs / "r")
    code, err = run_cli(["train", "--resume", str(runs / "r"), "--set", "model.d_model=64"], capsys)
    assert_one_line_error(code, err, "model.d_model cannot change on --resume", "allowed changes", "optim")
    assert snapshot(runs / "r") == before
    # an allowed change (a longer schedule, another learning rate) resumes
    assert main(["train", "--resume", str(runs / "r"), "--set", "train.steps=8", "--set", "optim.lr=5e-4"]) == 0
    assert [m["step"] for m in read_jsonl(runs / "r" / "metrics.jsonl")] == list(range(1, 9))


def test_existing_run_name_is_refused(env, capsys):
    root, _, base = env
    runs = root / "runs"
    args = ["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", "same", *sets(base)]
    assert main(args) == 0
    capsys.readouterr()
    before = snapshot(runs / "same")
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "already exists", "--resume")
    assert snapshot(runs / "same") == before


def _weights_of_another_shape(root: Path) -> str:
    from safetensors.torch import save_file

    path = root / "other.safetensors"
    save_file({"tok_emb.weight": torch.zeros(320, 48)}, path)
    return str(path)


REFUSED_WHILE_BUILDING = {  # each refused once the data is prepared (the first when the config is checked)
    "init_from missing": (lambda root: ["model.init_from=/nonexistent/w.safetensors"], "does not exist"),
    "init_from of another shape": (
        lambda root: [f"model.init_from={_weights_of_another_shape(root)}"],
        "was it made from a model of another shape",
    ),
    "chunked loss without a head": (
        lambda root: ["kernels.cross_entropy=chunked", "model.family=encoder", "train.objective=masked"],
        "takes no loss head",
    ),
    "callback option": (
        lambda root: ['callbacks.enabled=["layer_stats"]', "callbacks.layer_stats.every=0"],
        "callbacks.layer_stats.every must be >= 1",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_WHILE_BUILDING))
def test_a_configuration_refused_while_the_trainer_is_built_writes_no_run(env, capsys, case):
    root, _, base = env
    extra, says = REFUSED_WHILE_BUILDING[case]
    runs = root / "runs"
    code, err = run_cli(["train", "--runs-dir", str(runs), "--name", "refused", *sets(base + extra(root))], capsys)
    assert_one_line_error(code, err, says)
    assert not (runs / "refused").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(env, capsys):
    root, _, base = env
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, err = run_cli(["train", "--preset", "tiny", "--runs-dir", str(ro), "--name", "x", *sets(base)], capsys)
    assert_one_line_error(code, err, "cannot create the run folder")


def test_unwritable_output_dir(env, capsys, monkeypatch):
    """Stands in for a read-only or full disk even when running as root: mkdir fails."""
    root, _, base = env
    real_mkdir = Path.mkdir

    def failing_mkdir(self, *a, **k):
        if "runs" in self.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    code, err = run_cli(
        ["train", "--preset", "tiny", "--runs-dir", str(root / "runs"), "--name", "x", *sets(base)], capsys
    )
    assert_one_line_error(code, err, "cannot create the run folder", "Read-only file system")


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(tiny, monkeypatch):
    import kiln.train.checkpoint as ckpt
    from kiln.train.session import start_run

    make, runs = tiny
    real = ckpt.save_file
    state = {"armed": False, "snap": None}

    from kiln.train.callbacks import Callback

    class Arm(Callback):
        def on_checkpoint(self, trainer, step, path):
            if step == 10:  # every checkpoint after step 10 fails as on a full disk
                state["armed"] = True
                state["snap"] = snapshot(runs / "full" / "checkpoints")

    def full_disk(*a, **k):
        if state["armed"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(KilnError, match="No space left on device.*earlier checkpoints are intact"):
        start_run(make("checkpoint.every=5", "checkpoint.keep=2"), runs, "full", callbacks=[Arm()])
    assert snapshot(runs / "full" / "checkpoints") == state["snap"]
    assert not list((runs / "full" / "checkpoints").glob("*.tmp"))
    assert read_jsonl(runs / "full" / "events.jsonl")[-1]["kind"] == "checkpoint_failed"
    # with on_error = continue the run finishes without those checkpoints
    state["armed"] = False
    summary = start_run(make("checkpoint.every=5", "checkpoint.on_error=continue"), runs, "cont", callbacks=[Arm()])
    assert summary["steps"] == 30


def test_corrupted_newest_checkpoint_falls_back(tiny, capsys, monkeypatch):
    from kiln.train.session import resume_run, start_run

    make, runs = tiny
    start_run(make("train.steps=12", "checkpoint.every=4"), runs, "c")
    reference = [m["loss"] for m in read_jsonl(runs / "c" / "metrics.jsonl")]
    newest = runs / "c" / "checkpoints" / "step-00000012" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    monkeypatch.delenv("KILN_QUIET")
    resume_run(runs / "c", ["train.steps=12"])
    out = capsys.readouterr().out
    assert "step-00000012 is unusable (model.safetensors does not match its checksum)" in out
    assert "resumed" in out and "step-00000008" in out
    assert [m["loss"] for m in read_jsonl(runs / "c" / "metrics.jsonl")] == reference


def test_retention_keeps_last_k_plus_every_mth(tiny):
    from kiln.train.session import start_run

    make, runs = tiny
    start_run(
        make("train.steps=30", "checkpoint.every=3", "checkpoint.keep=2", "checkpoint.keep_every=12"), runs, "keep"
    )
    kept = sorted(int(p.name.split("-")[1]) for p in (runs / "keep" / "checkpoints").iterdir())
    assert kept == [12, 24, 27, 30]
