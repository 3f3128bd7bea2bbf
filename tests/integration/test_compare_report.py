"""`kiln compare` and `kiln report` on real tiny runs: a, b (another optim.lr), c (a fork of a at
step 8, fabricated: trained on its own, then given lineage.json and only the records after step
8), d (another vocabulary, so another tokenizer) and k (killed at step 3). Checked for content:
the config keys that differ, headline numbers equal to the runs' files, lineage curves, figure
sizes, tokenizer warnings, and a self-contained HTML report whose every image decodes."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import pytest
import torch
from PIL import Image

from kiln.errors import KilnError
from kiln.runs import compare as cmp
from kiln.runs import report as document
from kiln.runs.compare import compare_runs, compare_tables
from kiln.runs.curves import lineage_series
from kiln.runs.report import write_report
from kiln.runs.rundir import RunDir
from kiln.train.callbacks import Callback
from kiln.train.session import start_run

STEPS, FORK_STEP = 12, 8
COMPARE_SIZE = (int(cmp.FIG_WIDTH * cmp.DPI), int(2 * cmp.SUBPLOT_HEIGHT * cmp.DPI))
REPORT_SIZE = (int(document.FIGSIZE[0] * document.DPI), int(document.FIGSIZE[1] * document.DPI))


class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_log(self, trainer, record):
        if record["step"] == self.step:
            raise Crash(f"simulated kill at step {self.step}")


def keep_after(run: RunDir, step: int) -> None:
    """Make a run look like a fork at `step`: only its records (and reports) of later steps."""
    for path in (run.metrics_path, run.eval_path):
        kept = [r for r in run.read_jsonl(path) if r["step"] > step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    for report in run.eval_dir.glob("step-*.json"):
        if int(report.stem[5:]) <= step:
            report.unlink()


def fabricate_fork(run: RunDir, parent: RunDir, step: int, changes: list[str], from_scratch: bool = False) -> None:
    keep_after(run, 0 if from_scratch else step)
    tokens = {r["step"]: r["tokens"] for r in parent.metrics()}.get(step, 0)
    run.write_json(
        "lineage.json",
        {
            "parent": {
                "run": parent.name,
                "path": str(parent.path),
                "step": step,
                "checkpoint": f"step-{step:08d}",
                "checkpoint_sha256": "ab" * 32,
                "tokens": tokens,
            },
            "from_scratch": from_scratch,
            "changes": changes,
            "changed": {c.split("=")[0]: [None, c.split("=")[1]] for c in changes if "=" in c},
            "skip_batches": [[10, 11]],
            "new_tensors": [],
            "created": "2026-12-02T13:46:56+0000",
        },
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import tiny_overrides, write_corpus

    from kiln.config import load_config

    root = tmp_path_factory.mktemp("compare")
    corpus = write_corpus(root / "corpus")
    folder = root / "runs"

    def train(name, *extra, callbacks=()):
        cfg = load_config(
            overrides=tiny_overrides(
                corpus,
                root / "cache",
                f"train.steps={STEPS}",
                "eval.every=4",
                "checkpoint.every=4",
                'eval.suites=["lm"]',
                *extra,
            )
        )
        start_run(cfg, folder, name, callbacks=callbacks)
        return RunDir(folder / name)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train faster on one thread
    try:
        a, b, c = train("a"), train("b", "optim.lr=0.002"), train("c", "optim.lr=0.0005")
        d = train("d", "data.vocab_size=300")
        with pytest.raises(Crash):
            train("k", callbacks=[CrashAt(3)])
    finally:
        torch.set_num_threads(threads)
    fabricate_fork(c, a, FORK_STEP, ["optim.lr=0.0005", 'note=<b>&"x"'])
    c.log_event(
        {"step": 10, "kind": "loss_spike", "loss": 9.5, "grad_norm": 3.25, "data_index": 10, "action": "rollback"}
    )
    c.log_event(
        {"step": 8, "kind": "rollback", "from_step": 10, "checkpoint": "step-00000008", "batches_skipped": [8, 10]}
    )
    Image.new("RGB", (120, 80), "white").save(c.path / "layer_stats.png")  # as the layer_stats callback would
    # a fork of the fork (at step 10), and a from-scratch fork: copies of b with new lineage
    e = RunDir(folder / "e")
    shutil.copytree(b.path, e.path)
    fabricate_fork(e, c, 10, ["optim.lr=0.002"])
    s = RunDir(folder / "s")
    shutil.copytree(b.path, s.path)
    fabricate_fork(s, a, FORK_STEP, [], from_scratch=True)
    return {"a": a, "b": b, "c": c, "d": d, "k": RunDir(folder / "k"), "e": e, "s": s, "root": root}


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decodes the whole image, not only the header
        assert img.format == "PNG"
        return img.size


# --------------------------------------------------------------------------- curves


def test_lineage_series_follows_forks_to_their_fork_points(runs):
    a, c, e, s = runs["a"], runs["c"], runs["e"], runs["s"]
    segs = lineage_series(c, "metrics", "loss")
    assert [(g.run, g.inherited) for g in segs] == [("a", True), ("c", False)]
    assert segs[0].steps == list(range(1, FORK_STEP + 1)) and segs[1].steps == list(range(FORK_STEP + 1, STEPS + 1))
    parent = {r["step"]: r for r in a.metrics()}
    assert segs[0].x == "tokens" and segs[0].xs == [parent[i]["tokens"] for i in range(1, FORK_STEP + 1)]
    assert segs[0].ys == [parent[i]["loss"] for i in range(1, FORK_STEP + 1)]
    assert segs[1].ys == [r["loss"] for r in c.metrics()]
    evals = lineage_series(c, "evals", "val_loss")
    assert [(g.run, g.steps) for g in evals] == [("a", [4, 8]), ("c", [12])]
    # a fork of a fork: a up to 8, c from 9 to 10, then its own
    chain = lineage_series(e, "metrics", "loss")
    assert [(g.run, g.steps[0], g.steps[-1]) for g in chain] == [("a", 1, 8), ("c", 9, 10), ("e", 11, 12)]
    # from scratch: nothing of the parent
    assert [(g.run, g.inherited, len(g.xs)) for g in lineage_series(s, "metrics", "loss")] == [("s", False, STEPS)]


# --------------------------------------------------------------------------- compare


def test_compare_differences_headlines_and_files(runs, tmp_path):
    a, b, c = runs["a"], runs["b"], runs["c"]
    said = []
    result = compare_runs([a.path, b.path, c.path], tmp_path / "out", log=said.append)
    lr = a.config_dict()["optim"]["lr"]
    assert result["differences"] == {"optim.lr": [lr, 0.002, 0.0005]}  # model.d_model etc. are the same
    assert result["warnings"] == [] and said == [] and result["headline_loss"] == "val_loss"
    heads = {h["run"]: h for h in result["headlines"]}
    assert list(heads) == ["a", "b", "c"]
    for run in (a, b, c):
        h, evals, summary = heads[run.name], run.evals(), run.summary()
        assert h["final_val_loss"] == evals[-1]["val_loss"]
        assert h["best_val_loss"] == min(e["val_loss"] for e in evals)
        assert h["steps"] == STEPS and h["tokens"] == run.metrics()[-1]["tokens"]
        assert h["tokens_per_s"] == summary["tokens_per_s"] and h["mfu"] == summary["mfu"]
        assert h["status"] == "finished"
        assert h["suites"]["lm/bits_per_byte"] == evals[-1]["lm/bits_per_byte"] and "lm/acc" in h["suites"]
    assert heads["a"]["parent"] is None and (heads["c"]["parent"], heads["c"]["fork_step"]) == ("a", FORK_STEP)

    assert png_size(result["png"].read_bytes()) == COMPARE_SIZE
    md = result["md"].read_text()
    assert md == result["markdown"] and "![training and validation curves](compare.png)" in md
    assert f"| optim.lr | {lr:g} | 0.002 | 0.0005 |" in md
    row_a = next(line for line in md.splitlines() if line.startswith("| a |"))
    cells = [x.strip() for x in row_a.strip("|").split("|")]
    assert cells[1:4] == [f"{a.evals()[-1]['val_loss']:.4f}", f"{heads['a']['best_val_loss']:.4f}", str(STEPS)]
    assert cells[-1] != "—"  # suite columns filled
    assert "| a@8 |" in next(line for line in md.splitlines() if line.startswith("| c |"))
    # the parent is compared: the fork's inherited stretch is not drawn twice
    assert result["plots"][0]["runs"]["c"] == [{"run": "c", "inherited": False, "points": STEPS - FORK_STEP}]
    # the terminal tables
    from rich.console import Console

    console = Console(record=True, width=300)
    for table in compare_tables(result):
        console.print(table)
    text = console.export_text()
    assert "optim.lr" in text and "0.0005" in text and "a@8" in text


def test_compare_draws_the_parent_of_a_fork_that_is_not_compared(runs, tmp_path):
    result = compare_runs([runs["b"].path, runs["c"].path], tmp_path)
    assert result["plots"][0]["runs"]["c"] == [
        {"run": "a", "inherited": True, "points": FORK_STEP},
        {"run": "c", "inherited": False, "points": STEPS - FORK_STEP},
    ]
    assert result["plots"][1]["runs"]["c"][0] == {"run": "a", "inherited": True, "points": 2}
    assert (tmp_path / "compare.png").is_file() and not list(tmp_path.glob(".*tmp*"))


def test_compare_warns_about_different_tokenizers_and_uses_bits_per_byte(runs, tmp_path):
    a, d = runs["a"], runs["d"]
    said = []
    result = compare_runs([a.path, d.path], tmp_path, log=said.append)
    warning = "warning: runs a and d use different tokenizers; their losses per token are not comparable"
    assert result["warnings"] == [warning] and said == [warning]
    assert "data.vocab_size" in result["differences"] and "optim.lr" not in result["differences"]
    assert result["headline_loss"] == "lm/bits_per_byte"
    assert result["plots"][1]["key"] == "lm/bits_per_byte"
    md = result["markdown"]
    assert warning in md and "final bits/byte" in md
    row_d = next(line for line in md.splitlines() if line.startswith("| d |"))
    assert f"{d.evals()[-1]['lm/bits_per_byte']:.4f}" in row_d
    # same tokenizer: no warning
    assert compare_runs([a.path, runs["b"].path], tmp_path / "same")["warnings"] == []


def test_compare_metrics_and_mistakes(runs, tmp_path):
    a, b, k = runs["a"], runs["b"], runs["k"]
    said = []
    result = compare_runs(
        [a.path, b.path, k.path], tmp_path / "m", metrics=["grad_norm", "lm/acc", "lr"], log=said.append
    )
    assert [p["key"] for p in result["plots"]] == ["grad_norm", "lm/acc", "lr"]
    assert said == ["note: k records no 'lm/acc'"]
    assert set(result["plots"][1]["runs"]) == {"a", "b"}  # k was killed before any evaluation
    assert png_size(result["png"].read_bytes()) == (COMPARE_SIZE[0], int(3 * cmp.SUBPLOT_HEIGHT * cmp.DPI))
    killed = result["headlines"][2]
    assert killed["status"] == "failed" and killed["final_val_loss"] is None and killed["tokens_per_s"] is None
    assert "| k | — | — |" in result["markdown"]

    out = tmp_path / "nothing"
    with pytest.raises(KilnError, match=r"no run records a metric 'nope'; available: .*grad_norm.*val_loss"):
        compare_runs([a.path, b.path], out, metrics=["nope"])
    with pytest.raises(KilnError, match="at least two runs"):
        compare_runs([a.path], out)
    with pytest.raises(KilnError, match="not a Kiln run folder"):
        compare_runs([a.path, tmp_path / "missing"], out)
    with pytest.raises(KilnError, match="given twice"):
        compare_runs([a.path, a.path], out)
    assert not out.exists()


# --------------------------------------------------------------------------- report


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def section(md: str, heading: str) -> str:
    return md.split(heading + "\n", 1)[1].split("\n#", 1)[0]


def test_report_of_a_fork_with_events_and_layer_stats(runs, tmp_path):
    c = runs["c"]
    paths = write_report(c.path, tmp_path / "rep", log=lambda _: None)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    for name in ("loss.png", "lr.png", "grad_norm.png", "throughput.png", "layer_stats.png"):
        assert f"]({name})" in md and (tmp_path / "rep" / name).is_file()
    # self-contained: every resource is a data: URI, nothing fetched
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "<script" not in page and "<link" not in page
    sizes = [png_size(data) for data in images(page)]
    assert sizes == [REPORT_SIZE] * 4 + [(120, 80)]
    # escaped: the change string with markup shows as text
    assert "&lt;b&gt;&amp;&quot;x&quot;" in page and '<b>&"x"' not in page
    # lineage, events, evaluations, summary, config
    lineage = section(md, "## Lineage")
    assert "| c | a | 8 | step-00000008 | abababababab | optim.lr=0.0005" in lineage and "10..11" in lineage
    events = section(md, "## Guard and run events")
    assert "| c | 10 | loss_spike | rollback | 9.5 | 3.25 |" in events and "| c | 8 | rollback |" in events
    assert "forked from a at step 8" in md and "c ← a@8" in md
    assert "| 12 | 1,536 |" in section(md, "## Evaluations")
    assert re.search(r"^\| 12 \| [0-9.]+ \|", section(md, "### suite: lm"), re.M)
    assert "| tokens_per_s |" in section(md, "## Summary")
    assert "lr = 0.0005" in section(md, "## Configuration") and "lr = 0.0005" in page


def test_a_forks_report_marks_its_parents_events_before_the_fork_point(runs, tmp_path):
    e, c = runs["e"], runs["c"]  # e forked from c at step 10; c's events are at steps 10 and 8
    md = write_report(e.path, tmp_path / "rep-e", log=lambda _: None)["md"].read_text()
    events = section(md, "## Guard and run events")
    assert "| c (inherited) | 10 | loss_spike | rollback |" in events and "| c (inherited) | 8 | rollback |" in events
    marks = document._event_xs(e, "tokens")
    tokens = {r["step"]: r["tokens"] for r in runs["a"].metrics()}
    assert [(x, ev["step"], inherited) for x, ev, inherited in marks] == [
        (float(tokens[10]), 10, True),
        (float(tokens[8]), 8, True),
    ]
    assert document._event_xs(c, "step")[0][2] is False  # c's own events


def test_report_eval_tables_over_steps(runs):
    a = runs["a"]
    paths = write_report(a.path, log=lambda _: None)
    assert paths["md"] == a.path / "report" / "report.md" and paths["html"].is_file()
    md = paths["md"].read_text()
    evals = section(md, "## Evaluations")
    header = evals.split("\n| step | tokens |", 1)[1].splitlines()[0]
    assert "val_loss | val_ppl | val_acc" in header and "lm/bits_per_byte" in header
    suite = section(md, "### suite: lm")
    for step, record in zip((4, 8, 12), a.evals()):
        assert f"| {step} | {record['tokens']:,} | {record['val_loss']:.5g} |" in evals
        assert re.search(rf"^\| {step} \| ", suite, re.M)
    assert section(md, "## Guard and run events").strip() == "none"
    assert "none: the run was started afresh" in section(md, "## Lineage")
    assert "layer_stats.png" not in md


def test_report_of_a_killed_run_and_of_a_run_that_never_trained(runs, tmp_path):
    paths = write_report(runs["k"].path, tmp_path / "k", log=lambda _: None)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "status: failed at step 3 (Crash: simulated kill at step 3)" in md
    assert "no evaluations recorded" in md and "none: the run has no summary.json" in md
    assert [png_size(d) for d in images(page)] == [REPORT_SIZE] * 4  # the steps it logged
    # created, then killed before its first step
    from kiln.config import load_config

    bare = RunDir.create(tmp_path / "runs", "bare", load_config(preset="tiny"))
    paths = write_report(bare.path, log=lambda _: None)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "none: no training steps were logged" in md and "<img" not in page
    assert "status: created" in md and "## Configuration" in md
    with pytest.raises(KilnError, match="not a Kiln run folder"):
        write_report(tmp_path / "nowhere")
