"""`kiln sweep`: points become ordinary runs; finished ones are skipped and interrupted ones resumed
on a second run; the runs then fit a law with `kiln scaling fit`."""

from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.errors import ConfigError
from kiln.scaling.sweep import load_sweep, run_sweep

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\nclass C{i}:\n    y = {i}\n" for i in range(400))
COMMON = [
    "model.seq_len=32",
    "train.batch_size=4",
    "data.vocab_size=300",
    "eval.every=0",
    "eval.batches=2",
    "checkpoint.every=0",
    "log.plot=false",
    "guard.hang_min_s=0",
    "train.precision=fp32",
    "eval.sample_tokens=2",
    "data.piece_chars=500",
    "schedule.warmup_steps=2",
]


def sweep_file(tmp_path, body: str) -> str:
    (tmp_path / "corpus.txt").write_text(TEXT)
    sets = COMMON + [f"data.corpus={tmp_path / 'corpus.txt'}", f"data.cache_dir={tmp_path / 'cache'}"]
    path = tmp_path / "sweep.toml"
    path.write_text(f'name = "s"\npreset = "tiny"\nset = {json.dumps(sets)}\n' + body)
    return str(path)


def test_grid_points_run_then_skip_then_resume(tmp_path):
    path = sweep_file(
        tmp_path,
        "shapes = [{n_layers = 1, d_model = 32, n_heads = 2}, "
        "{n_layers = 2, d_model = 64, n_heads = 2}]\ntokens = [1280]\n"
        'lr_rule = "width"\n',
    )
    lines: list[str] = []
    points = run_sweep(path, tmp_path / "runs", parallel=2, log=lines.append, progress_s=0.5)
    assert [p.state for p in points] == ["finished"] * 2 and all(p.loss for p in points)
    runs = sorted((tmp_path / "runs" / "s").iterdir())
    assert len(runs) == 2 and "point" in lines[0] and lines[-1].count("10/10") == 2
    assert any("running" in line for line in lines[1:-1])  # the live table while points train
    steps = {r.name: json.loads((r / "summary.json").read_text())["steps"] for r in runs}
    assert sorted(steps.values()) == [10, 10]  # tokens / (batch 4 x 32)
    lrs = {r.name: r.joinpath("config.toml").read_text().split("lr = ")[1].split("\n")[0] for r in runs}
    assert float(lrs["L1-d32-T1.28e03"]) == 2 * float(lrs["L2-d64-T1.28e03"])  # LR x preset width / d_model
    # a second run skips what finished and resumes what did not
    victim = runs[0]
    (victim / "summary.json").unlink()
    (victim / "status.json").write_text(json.dumps({"state": "interrupted"}))
    points = run_sweep(path, tmp_path / "runs", log=lambda _: None)
    assert sorted(p.state for p in points) == ["finished", "skipped"]
    assert (victim / "summary.json").is_file()
    from kiln.scaling.points import points_from_runs

    found = points_from_runs([tmp_path / "runs" / "s"])  # the sweep's folder stands for its runs
    assert len(found) == 2 and found[0].params != found[1].params


def test_isoflop_points_share_their_budget(tmp_path):
    path = sweep_file(tmp_path, "params = [1e5, 1e6, 1e7]\nflops = [1e12, 1e13]\nwarmup_fraction = 0.1\n")
    name, points = load_sweep(path)
    assert name == "s" and len(points) == 6
    from kiln.config import load_config
    from kiln.scaling.flops import flops_per_token

    for p in points:  # C in the MFU's accounting, as the fit reads runs
        model = load_config("tiny", overrides=p.overrides).model
        budget = flops_per_token(model, 300) * p.tokens
        assert min(abs(budget / c - 1) for c in (1e12, 1e13)) < 0.05


def test_seeds_repeat_every_point_under_its_own_train_seed(tmp_path):
    _, once = load_sweep(sweep_file(tmp_path, "params = [1e5, 1e6]\ntokens = [1e4]\n"))
    name, points = load_sweep(sweep_file(tmp_path, "params = [1e5, 1e6]\ntokens = [1e4]\nseeds = [0, 3]\n"))
    # the preset's seed (0) keeps the names a sweep without seeds gave: adding seeds reuses its runs
    assert [p.name for p in points] == [once[0].name, once[0].name + "-s3", once[1].name, once[1].name + "-s3"]
    from kiln.config import load_config

    assert [load_config("tiny", overrides=p.overrides).train.seed for p in points] == [0, 3, 0, 3]


@pytest.mark.parametrize(
    "body, words",
    [
        ("params = [1e5]\ntokens = [1e4]\nseeds = [1, 1]\n", "seeds must be a list of distinct"),
        ("params = [1e5]\ntokens = [1e4]\nseeds = 2\n", "seeds must be a list of distinct"),
        ("params = [1e5]\ntokens = [1e4]\nseeds = [[1]]\n", "seeds must be a list of distinct"),
        ("tokens = [1000]\n", "params = [...] or as shapes"),
        ("params = [1e5]\n", "tokens = [...] (a grid) or flops"),
        ("params = [1e5]\ntokens = [-1]\n", "positive numbers"),
        ('params = [1e5]\ntokens = [1e4]\nlr_rule = "sqrt"\n', "lr_rule"),
        ("params = [1e5]\ntokens = [1e4]\nsizes = 3\n", "unknown key(s) sizes"),
    ],
)
def test_bad_sweep_files_are_refused(tmp_path, body, words):
    with pytest.raises(
        ConfigError,
        match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)").replace(".", r"\."),
    ):
        load_sweep(sweep_file(tmp_path, body))


def test_cli_dry_run_lists_the_points(tmp_path, capsys):
    path = sweep_file(tmp_path, "params = [1e5, 1e6]\ntokens = [1e4]\n")
    assert main(["sweep", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("s/L") == 2 and "--set train.tokens=" in out
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2


@pytest.mark.slow
def test_a_real_isoflop_sweep_fits_and_predicts(tmp_path, capsys):
    """The demo's loop at a small scale (`make scaling-demo` is the full one): sweep, fit, predict."""
    path = sweep_file(
        tmp_path,
        "shapes = [{n_layers = 1, d_model = 32, n_heads = 2}, "
        "{n_layers = 2, d_model = 48, n_heads = 2}, {n_layers = 2, d_model = 64, n_heads = 2}]\n"
        "flops = [2e10, 6e10]\n",
    )
    run_sweep(path, tmp_path / "runs", parallel=2, log=lambda _: None)
    fit_json = tmp_path / "fit.json"
    assert (
        main(
            [
                "scaling",
                "fit",
                str(tmp_path / "runs" / "s"),
                "--json",
                str(fit_json),
                "--bootstrap",
                "10",
                "--plot",
                str(tmp_path / "fit.png"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # two budgets of three sizes: two IsoFLOP groups, whether or not both minima fall inside the sizes
    # (that depends on six tiny runs' losses); the report says which
    assert "compute-optimal (approach 2" in out and "of 2 IsoFLOP groups" in out and (tmp_path / "fit.png").is_file()
    assert main(["scaling", "predict", str(fit_json), "--params", "2e5", "--tokens", "1e6"]) == 0
    assert "predicted loss" in capsys.readouterr().out
