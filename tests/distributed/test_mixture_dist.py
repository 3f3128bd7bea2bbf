"""A mixture on two gloo ranks: each global batch is drawn the same at any world size (so the
losses match one process within the layouts' reduction-order tolerance, and the tokens drawn
per source exactly), and a checkpoint saved by two ranks resumes on one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dist_helpers import assert_close, base_overrides, losses, run_kiln, write_corpus


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_on_two_ranks_matches_one_and_resumes_on_one(tmp_path):
    a = write_corpus(tmp_path)  # (tmp_path / "corpus")
    b = tmp_path / "b"
    b.mkdir()
    for i in range(30):  # another flavour of text: numbers
        (b / f"n{i:02d}.txt").write_text(
            "\n".join(" ".join(str((i * j * k) % 97) for k in range(12)) for j in range(40))
        )
    mix = tmp_path / "mix.toml"
    mix.write_text(
        f'[[data.sources]]\nname = "words"\ncorpus = "{a}"\nweight = 2\n\n'
        f'[[data.sources]]\nname = "numbers"\ncorpus = "{b}"\nweight = 1\n\n'
        "[[data.stages]]\nstart = 6\nweights = {words = 1, numbers = 3}\n"
    )
    base = base_overrides(tmp_path / "cache", a)
    runs = tmp_path / "runs"
    run_kiln(["train", "--preset", "tiny", "--config", str(mix), "--runs-dir", str(runs), "--name", "one",
              *[x for o in base for x in ("--set", o)]])  # fmt: skip
    train_two = ["train", "--preset", "tiny", "--config", str(mix), "--runs-dir", str(runs), "--name", "two"]
    run_kiln([*train_two, *[x for o in base for x in ("--set", o)]], nproc=2)
    one, two = records(runs / "one"), records(runs / "two")
    assert_close(losses(runs / "two"), losses(runs / "one"))
    assert [(r["tokens/words"], r["tokens/numbers"]) for r in two] == [
        (r["tokens/words"], r["tokens/numbers"]) for r in one
    ]

    cut = runs / "two-to-one"  # the two-rank run from its step-5 checkpoint, resumed on one process
    shutil.copytree(runs / "two", cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000010")
    for name in ("metrics.jsonl", "eval.jsonl"):
        kept = [line for line in (cut / name).read_text().splitlines() if json.loads(line)["step"] <= 5]
        (cut / name).write_text("".join(line + "\n" for line in kept))
    (cut / "summary.json").unlink()
    run_kiln(["train", "--resume", str(cut)])
    assert_close(losses(cut), losses(runs / "one"))
