"""Masked-LM pretraining end to end: a bert-tiny-shaped encoder learns to fill masks far better
than always guessing the most frequent masked token, and a killed masked run resumes with the
very same losses.

(The 2-rank FSDP parity test for the masked objective belongs with the distributed tests.)
"""

import json
import random

import pytest
import torch

from kiln.config import load_config
from kiln.train.callbacks import Callback
from kiln.train.session import resume_run, start_run

STEPS = 150
SMALL = [  # bert-tiny's shape, shrunk to seconds
    "data.vocab_size=400",
    "data.val_fraction=0.2",
    "model.n_layers=2",
    "model.d_model=128",
    "model.n_heads=4",
    "model.seq_len=64",
    "model.pos=rope",
    "train.batch_size=16",
    "train.device=cpu",
    "train.precision=fp32",
    "optim.lr=1e-3",
    "schedule.warmup_steps=20",
    "eval.batches=4",
    "checkpoint.keep=0",
    "log.plot=false",
]
OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
NOUNS = "cat dog fox bird fish horse mouse snake".split()
PLACES = "mat log box tree pond roof wall bench".split()


def write_corpus(folder, n_files=40, seed=0):
    """Code and prose whose words are given away by context on either side: `def add_3(a, b)`
    returns `a + b`, and the second noun and place of a sentence repeat the first."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(n_files):
        parts = []
        for _ in range(30):
            if rng.random() < 0.5:
                name, op = rng.choice(list(OPS.items()))
                parts.append(f"def {name}_{rng.randint(0, 9)}(a, b):\n    return a {op} b\n")
            else:
                n, p = rng.choice(NOUNS), rng.choice(PLACES)
                parts.append(f"The {n} sat on the {p}, and the {n} stayed on the {p}.\n")
        (folder / f"doc{i:03d}.txt").write_text("".join(parts))
    return folder


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    write_corpus(root / "corpus")
    return root


def small(root, *extra):
    return load_config(
        preset="bert-tiny",
        overrides=[*SMALL, f"data.corpus={root / 'corpus'}", f"data.cache_dir={root / 'cache'}", *extra],
    )


def test_masked_accuracy_ends_far_above_the_majority_baseline(root):
    cfg = small(root, f"train.steps={STEPS}", f"eval.every={STEPS // 2}", "checkpoint.every=0", "log.every=10")
    summary = start_run(cfg, root / "runs", "learn")
    acc, base = summary["val_masked_acc"], summary["majority_baseline"]
    print(
        f"\nafter {STEPS} steps: val_masked_acc {acc:.3f}  majority_baseline {base:.3f}  "
        f"val_loss {summary['val_loss']:.3f}  unigram entropy {summary['unigram_entropy']:.3f}"
    )
    assert acc > 2 * base and acc > base + 0.15
    assert summary["val_acc"] == acc
    evals = jsonl(root / "runs" / "learn" / "eval.jsonl")
    assert [e["step"] for e in evals] == [STEPS // 2, STEPS]
    # The held-out masks are fixed: every evaluation predicts the same positions.
    assert len({(e["val_tokens"], e["majority_baseline"]) for e in evals}) == 1
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    samples = (root / "runs" / "learn" / "samples.txt").read_text()
    assert "fill-mask" in samples and "→" in samples
    assert summary["sample"]["text"]


class Crash(Exception):
    pass


class CrashAfterCheckpoint(Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_checkpoint(self, trainer, step, path):
        if step == self.at:
            raise Crash(f"simulated kill after the checkpoint of step {self.at}")


def test_a_killed_masked_run_resumes_exactly(root):
    n = 5
    cfg = small(
        root,
        f"train.steps={2 * n}",
        f"checkpoint.every={n}",
        "eval.every=0",
        "log.every=1",
        "model.dropout=0.1",
        "mask.whole_word=true",
    )
    torch.manual_seed(0)  # neither the runs nor the resume may depend on the process's RNG state
    start_run(cfg, root / "runs", "full")
    torch.manual_seed(1)
    with pytest.raises(Crash):
        start_run(cfg, root / "runs", "killed", callbacks=[CrashAfterCheckpoint(n)])
    assert len(jsonl(root / "runs" / "killed" / "metrics.jsonl")) == n
    torch.manual_seed(123)
    resume_run(root / "runs" / "killed")
    full = jsonl(root / "runs" / "full" / "metrics.jsonl")
    resumed = jsonl(root / "runs" / "killed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 2 * n + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    final = [json.loads((root / "runs" / name / "summary.json").read_text()) for name in ("full", "killed")]
    assert final[0]["val_loss"] == final[1]["val_loss"]
    assert final[0]["val_masked_acc"] == final[1]["val_masked_acc"]


def test_bert_tiny_on_stdlib_beats_the_majority_baseline(tmp_path, monkeypatch, capsys):
    """The issue's check, on the real demo corpus: `bert-tiny` on the standard library for a few
    hundred steps ends far above always predicting the most frequent masked token. A fixed number
    of steps rather than the preset's time budget: a slow machine must not turn this into a
    shorter run (CI once got 114 steps in the budget and ended at 2.2x the baseline)."""
    monkeypatch.setenv("KILN_QUIET", "1")
    cfg = load_config(
        preset="bert-tiny",
        overrides=[
            f"data.cache_dir={tmp_path / 'cache'}",
            "eval.every=0",
            "eval.batches=2",
            "train.time_budget_s=0",
            # at 150 steps 3.8x, 4.6x and 5.9x the baseline at seeds 0, 1, 2 (both kernel sets of a Zen 3
            # alike), val_loss 0.11-0.26 under the bound; 220 steps reached ~7x at twice the cost
            "train.steps=150",
            "checkpoint.every=0",
            "log.plot=false",
            "guard.hang_min_s=0",
        ],
    )
    summary = start_run(cfg, tmp_path / "runs", "bert-tiny")
    with capsys.disabled():
        print(
            f"\nbert-tiny on stdlib, {summary['steps']} steps: val_masked_acc {summary['val_masked_acc']:.3f}, "
            f"majority_baseline {summary['majority_baseline']:.3f}, val_loss {summary['val_loss']:.3f}, "
            f"unigram entropy {summary['unigram_entropy']:.3f}"
        )
    assert summary["val_masked_acc"] > 3 * summary["majority_baseline"]
    assert summary["val_loss"] < summary["unigram_entropy"] - 0.5
