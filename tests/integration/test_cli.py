"""The `kiln` command line, driven through `kiln.cli.main(argv)`."""

import pytest
from conftest import tiny_overrides

from kiln.cli import main


def sets(overrides):
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_lists_presets(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    from kiln.config import preset_names

    names = preset_names()
    assert {"tiny", "gpt2-124m", "llama-1b"} <= set(names)
    assert "presets: " + ", ".join(names) in " ".join(out.split())  # the help wraps long lines
    if argv[0] == "train":
        assert "--set" in out and "--resume" in out
    else:
        assert "train" in out and "prepare" in out and "sample" in out


def test_no_verb_prints_help(capsys):
    assert main([]) == 2
    assert "usage: kiln" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--set", "train.stpes=10"], "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
        (["train", "--set", "model.n_heads=5"], "model.n_heads = 5 must divide model.d_model = 128"),
        (["train", "--set", "train.steps=many"], "train.steps must be an integer, got 'many'"),
        (["train", "--set", "nonsense"], "expected section.key=value"),
        (["train", "--preset", "huge"], "unknown preset 'huge'"),
        (["prepare", "--set", "optim.lr=-1"], "optim.lr must be positive"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("kiln: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err + captured.out


def test_missing_corpus_is_a_one_line_error(tmp_path, capsys):
    argv = ["prepare", *sets(tiny_overrides(tmp_path / "absent", tmp_path / "cache"))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent" in err and "Traceback" not in err


def test_prepare_prints_the_dataset(make_corpus, tmp_path, capsys):
    argv = ["prepare", *sets(tiny_overrides(make_corpus(), tmp_path / "cache"))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dataset " in out and "dtype uint16" in out and "validation unigram entropy" in out


def test_train_twice_with_one_name_is_refused_then_sample(make_corpus, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    argv = [
        "train",
        *sets(tiny_overrides(make_corpus(), tmp_path / "cache", "train.steps=3")),
        "--name",
        "same",
        "--runs-dir",
        str(runs),
    ]
    monkeypatch.delenv("KILN_QUIET")  # let it print the final table
    assert main(argv) == 0
    monkeypatch.setenv("KILN_QUIET", "1")
    out = capsys.readouterr().out
    assert "Kiln run" in out and "validation loss" in out and "unigram entropy" in out
    run = runs / "same"
    before = snapshot(run)
    assert "summary.json" in before and "metrics.jsonl" in before

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert snapshot(run) == before  # the first run is untouched

    assert main(["sample", str(run), "--prompt", "def ", "--max-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and "-" * 40 in out
    assert main(["sample", str(run), "--prompt", "x", "--prompt", "y", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("-" * 40) == 2

    assert main(["sample", str(run), "--step", "2"]) == 2
    assert "checkpoint step 2" in capsys.readouterr().err

    assert main(["train", "--resume", str(run), "--preset", "tiny"]) == 2
    assert "--resume takes its config from the run folder" in capsys.readouterr().err


def test_sample_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a Kiln run folder" in capsys.readouterr().err
