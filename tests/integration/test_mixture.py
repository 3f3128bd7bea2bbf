"""`[[data.sources]]` and `[[data.stages]]` end to end: a two-source mixture trains by weight,
evaluates each source, resumes exactly, changes weights at its stage and in a fork, prepares only a
new source when the tokenizer is pinned, and refuses bad input in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides, write_corpus

from kiln.cli import main
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, STAGE = 16, 8


def mix_toml(path: Path, a: Path, b: Path, extra: str = "") -> Path:
    path.write_text(
        f"""
[[data.sources]]
name = "alpha"
corpus = "{a}"
weight = 3

[[data.sources]]
name = "beta"
corpus = "{b}"
weight = 1

[[data.stages]]
start = {STAGE}
weights = {{alpha = 1, beta = 1}}
{extra}"""
    )
    return path


class Crash(Exception):
    pass


class CrashAt(Callback):
    order = 99

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_log(self, trainer, record):
        if record["step"] == self.at:
            raise Crash(f"simulated kill at step {self.at}")


class Sources(Callback):
    """The source of every sequence each step trains on, from the sampler's window ids."""

    def __init__(self):
        super().__init__()
        self.by_step: list[np.ndarray] = []

    def on_step_start(self, trainer, step, data_index):
        ids = trainer.sampler.sample_indices(data_index)
        self.by_step.append(np.searchsorted(trainer.sampler.first_id, ids, side="right") - 1)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    a = write_corpus(root / "a", n_files=30, seed=1)
    b = write_corpus(root / "b", n_files=30, seed=2)
    mix = mix_toml(root / "mix.toml", a, b)
    extra = [f"train.steps={STEPS}", "train.batch_size=8", "checkpoint.every=4", "eval.every=8"]

    def cfg(*more: str, config: Path = mix):
        return load_config("tiny", config, tiny_overrides(a, root / "cache", *extra, *more))

    sources = Sources()
    start_run(cfg(), root / "runs", "full", callbacks=[sources])
    return root, cfg, sources.by_step


def test_batches_are_drawn_by_weight_and_logged_per_source(setup):
    root, cfg, by_step = setup
    records = jsonl(root / "runs" / "full" / "metrics.jsonl")
    seq = cfg().model.seq_len
    for r in records:  # the logged tokens per source are what the steps trained on
        drawn = np.bincount(np.concatenate(by_step[: r["step"]]), minlength=2) * seq
        assert [r["tokens/alpha"], r["tokens/beta"]] == drawn.tolist()
        assert r["tokens/alpha"] + r["tokens/beta"] == r["tokens"]
    before = np.bincount(np.concatenate(by_step[:STAGE]), minlength=2)
    assert abs(before[0] / before.sum() - 0.75) <= 0.02  # weights 3 : 1
    after = np.bincount(np.concatenate(by_step[STAGE:]), minlength=2)
    assert abs(after[0] / after.sum() - 0.5) <= 0.02  # the stage's 1 : 1 from its step on
    events = [e for e in jsonl(root / "runs" / "full" / "events.jsonl") if e["kind"] == "mixture"]
    assert [(e["step"], e["changes"], e["weights"]) for e in events] == [
        (STAGE, ["stage"], {"alpha": 0.5, "beta": 0.5})
    ]


def test_a_mixture_at_scale_meets_its_weights_within_two_percent(setup):
    from kiln.data.dataset import prepare_data
    from kiln.train.mixture import build_mixture

    _, cfg, _ = setup
    config = cfg("data.sources.beta.weight=0.25", "data.sources.alpha.weight=0.75")
    sampler, _ = build_mixture(
        load_config(base={**_no_stages(config)}), prepare_data(config, log=lambda _: None), 0, 1, None, {}
    )
    drawn = np.bincount(np.concatenate([sampler.schedule.route(np.arange(i * 8, i * 8 + 8))[0] for i in range(500)]))
    assert abs(drawn[0] / drawn.sum() - 0.75) <= 0.02 * 0.75 and abs(drawn[1] / drawn.sum() - 0.25) <= 0.02 * 0.25


def _no_stages(config) -> dict:
    from kiln.config import to_dict

    d = to_dict(config)
    d["data"]["stages"] = []
    return d


def test_each_source_is_evaluated_and_the_loss_is_their_weighted_mean(setup):
    root, _, _ = setup
    evals = jsonl(root / "runs" / "full" / "eval.jsonl")
    assert [e["step"] for e in evals] == [8, 16]
    for e in evals:
        assert e["val_loss"] == pytest.approx((3 * e["val_loss/alpha"] + e["val_loss/beta"]) / 4, rel=1e-12)
        assert e["val_tokens"] == e["val_tokens/alpha"] + e["val_tokens/beta"]
    summary = json.loads((root / "runs" / "full" / "summary.json").read_text())
    assert "val_loss/alpha" in summary and "val_loss/beta" in summary


def test_a_mixture_resumes_exactly(setup):
    root, cfg, _ = setup
    with pytest.raises(Crash):
        start_run(cfg(), root / "runs", "cut", callbacks=[CrashAt(6)])
    resume_run(root / "runs" / "cut")
    full, cut = jsonl(root / "runs" / "full" / "metrics.jsonl"), jsonl(root / "runs" / "cut" / "metrics.jsonl")
    assert [r["step"] for r in cut] == list(range(1, STEPS + 1))
    for x, y in zip(full, cut):
        assert (x["loss"], x["tokens/alpha"], x["tokens/beta"]) == (y["loss"], y["tokens/alpha"], y["tokens/beta"])


def test_resuming_with_another_mix_is_refused_and_a_fork_changes_it(setup, tmp_path):
    from kiln.runs.compare import compare_runs, headline_rows

    root, _, _ = setup
    parent = root / "runs" / "full"
    with pytest.raises(KilnError, match="kiln fork"):
        resume_run(parent, overrides=["data.sources.beta.weight=5"])
    assert main(
        ["fork", str(parent), "--step", "8", "--name", "reweighted", "--set", "data.stages=[]",
         "--set", "data.sources.beta.weight=3", "--set", "data.sources.alpha.weight=1"]
    ) == 0  # fmt: skip
    fork = root / "runs" / "reweighted"
    assert json.loads((fork / "lineage.json").read_text())["mixture"]["eras"][-1]["start"] == 8
    resume_run(fork)
    parent_records, records = jsonl(parent / "metrics.jsonl"), jsonl(fork / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(9, STEPS + 1))  # trained on from the parent's step 8
    at_fork = parent_records[7]
    gained = np.array([records[-1]["tokens/alpha"], records[-1]["tokens/beta"]]) - [
        at_fork["tokens/alpha"],
        at_fork["tokens/beta"],
    ]
    assert abs(gained[1] / gained.sum() - 0.75) <= 0.02  # beta now weighs 3 of 4
    # kiln compare shows each source's validation loss beside the overall one, and the changed mix
    result = compare_runs([parent, fork], tmp_path, log=lambda _: None)
    columns, rows = headline_rows(result)
    finals = [jsonl(run / "eval.jsonl")[-1] for run in (parent, fork)]
    for name in ("alpha", "beta"):
        cells = [row[columns.index(f"val_loss/{name}")] for row in rows]
        assert cells == [f"{final[f'val_loss/{name}']:.4f}" for final in finals]
    assert "data.sources" in result["differences"] or any(k.startswith("data.sources") for k in result["differences"])


def test_a_pinned_tokenizer_prepares_only_a_new_source(setup, tmp_path, capsys):
    root, _, _ = setup
    tok = next((root / "cache").glob("tokenizer-*/tokenizer.json"))
    c = write_corpus(tmp_path / "c", n_files=10, seed=3)
    two = mix_toml(tmp_path / "two.toml", root / "a", root / "b")
    three = mix_toml(
        tmp_path / "three.toml", root / "a", root / "b", f'[[data.sources]]\nname = "gamma"\ncorpus = "{c}"\n'
    )
    base = [
        "prepare",
        "--preset",
        "tiny",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        f"data.tokenizer={tok}",
    ]
    assert main([*base, "--config", str(two)]) == 0
    capsys.readouterr()
    assert main([*base, "--config", str(three)]) == 0
    out = capsys.readouterr().out
    assert (
        "source gamma: prepared" in out and "source alpha: prepared" not in out and "source beta: prepared" not in out
    )


@pytest.mark.parametrize(
    "extra, needle",
    [
        ('[[data.sources]]\nname = "alpha"\ncorpus = "stdlib"\n', "names 'alpha' twice"),
        ('[[data.sources]]\nname = "gamma"\ncorpus = "stdlib"\nweight = -1\n', "weight must be >= 0"),
        ('[[data.sources]]\nname = "gamma"\ncorpus = "stdlib"\ntokenizer = "t.json"\n', "share one tokenizer"),
        ('[[data.sources]]\nname = "gamma"\ncorpus = "stdlib"\nwieght = 2\n', "unknown config key"),
        ('[[data.sources]]\nname = "gamma"\ncorpus = "EMPTY"\n', "data.sources.gamma: data.corpus"),
    ],
)
def test_bad_mixtures_get_one_line_and_nothing_is_written(setup, tmp_path, capsys, extra, needle):
    root, _, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    config = mix_toml(tmp_path / "bad.toml", root / "a", root / "b", extra.replace("EMPTY", str(empty)))
    runs = tmp_path / "runs"
    code = main(["train", "--preset", "tiny", "--config", str(config), "--runs-dir", str(runs), "--name", "x",
                 "--set", f"data.cache_dir={root / 'cache'}", "--set", "train.steps=2"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not runs.exists()


def test_weights_that_sum_to_zero_are_refused(setup):
    _, cfg, _ = setup
    with pytest.raises(KilnError, match="sum to 0"):
        cfg("data.sources.alpha.weight=0", "data.sources.beta.weight=0")


def test_the_report_shows_the_mix_and_what_each_source_gave(setup, tmp_path):
    from kiln.runs.report import write_report

    root, _, _ = setup
    write_report(root / "runs" / "full", tmp_path / "report", log=lambda _: None)
    text = (tmp_path / "report" / "report.md").read_text()
    section = text[text.index("## Data mixture") : text.index("## Guard and run events")]
    records = jsonl(root / "runs" / "full" / "metrics.jsonl")
    assert "| alpha |" in section and "| 75.0% |" in section and f"| {records[-1]['tokens/alpha']:,}" in section
    assert "| beta |" in section and "| 25.0% |" in section
    assert f"| {STAGE} | alpha 1, beta 1 |" in section


def test_each_source_is_counted_once_when_the_tokenizer_is_trained(setup, tmp_path, monkeypatch):
    """The tokenizer's counting pass over each source is the one its preparation uses: the corpus
    is not read again for it."""
    from kiln.data import mixture, shards
    from kiln.data.dataset import prepare_data

    root, cfg, _ = setup
    calls: list[str] = []
    real = shards.count_corpus

    def counting(c, items, log=print):
        calls.append(c.corpus)
        return real(c, items, log)

    monkeypatch.setattr(shards, "count_corpus", counting)
    monkeypatch.setattr(mixture, "count_corpus", counting)
    prepare_data(cfg(f"data.cache_dir={tmp_path / 'cache'}"), log=lambda _: None)
    assert sorted(calls) == sorted([str(root / "a"), str(root / "b")])
