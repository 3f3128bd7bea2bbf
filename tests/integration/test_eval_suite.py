"""Every evaluation suite on a tiny trained run: numbers in range, the trained model beating the
untrained one, `[eval] suites` during training, and `kiln eval` with bad task files."""

import json
import random
from pathlib import Path

import pytest
import torch

from kiln.cli import main
from kiln.config import load_config
from kiln.eval.runner import evaluate_run
from kiln.train.session import start_run

STEPS = 150

pytestmark = pytest.mark.usefixtures("one_thread")


MOTTOS = [
    "the early bird catches the worm and sings all morning long",
    "a rolling stone gathers no moss on the green hill",
    "every cloud has a silver lining after the rain",
    "actions speak louder than words in the town square",
]
WORDS = "fox dog model token shard loader tensor batch river stone cloud".split()


def write_corpus(folder: Path, n_docs: int = 40) -> Path:
    """Random prose and Python, and in every document the same four lines (which the model learns)."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for d in range(n_docs):
        lines = []
        for _ in range(10):
            if rng.random() < 0.4:
                name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}"
                lines.append(f"def {name}(x, y):\n    return x {rng.choice('+-*')} y")
            else:
                lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + ".")
        lines[4:4] = MOTTOS
        (folder / f"doc{d:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def motto_task(path: Path) -> Path:
    """Multiple choice where the right answer is training text: a motto's true ending, against the
    same words shuffled and the ending of another motto."""
    rng = random.Random(1)
    rows = []
    for i, motto in enumerate(MOTTOS):
        words = motto.split()
        head, tail = " ".join(words[:4]), words[4:]
        shuffled = tail[:]
        while shuffled == tail:
            rng.shuffle(shuffled)
        other = " ".join(MOTTOS[(i + 1) % len(MOTTOS)].split()[4:])
        choices = [" ".join(tail), " ".join(shuffled), other]
        order = [1, 2, 0] if i % 2 else [0, 1, 2]
        rows.append({"context": head, "choices": [choices[j] for j in order], "gold": order.index(0)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_run")
    corpus = write_corpus(tmp / "corpus")
    cfg = load_config(
        preset="tiny",
        overrides=[
            f"data.corpus={corpus}",
            f"data.cache_dir={tmp / 'cache'}",
            "data.vocab_size=512",
            "data.val_fraction=0.2",
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=4",
            "model.seq_len=64",
            f"train.steps={STEPS}",
            "train.batch_size=8",
            "train.device=cpu",
            "train.precision=fp32",
            "train.threads=1",
            "schedule.warmup_steps=15",
            "optim.lr=3e-3",
            "eval.every=0",
            "eval.batches=4",
            "eval.sample_tokens=4",
            'eval.suites=["lm", "choice"]',
            "checkpoint.every=0",
            "log.every=50",
            "log.plot=false",
        ],
    )
    threads = torch.get_num_threads()
    start_run(cfg, tmp / "runs", "tiny")
    torch.set_num_threads(threads)
    return tmp / "runs" / "tiny", motto_task(tmp / "mottos.jsonl")


OPTIONS = ["memorisation.samples=24", "continuation.items=24", "toxicity.samples=2", "toxicity.new_tokens=16"]


def test_training_runs_the_configured_suites(run):
    path, _ = run
    report = json.loads((path / "eval" / f"step-{STEPS}.json").read_text())
    assert set(report["suites"]) == {"lm", "choice"} and report["step"] == STEPS
    last = [json.loads(line) for line in (path / "eval.jsonl").read_text().splitlines()][-1]
    assert last["lm/loss"] == pytest.approx(last["val_loss"])  # the same windows as the trainer's evaluation
    assert "choice/cloze/acc" in last


def test_every_suite_gives_numbers_in_range(run):
    path, task = run
    report, out = evaluate_run(path, options=[f"choice.tasks={task}", *OPTIONS])
    assert out == path / "eval" / f"step-{STEPS}.json" and report["step"] == STEPS
    s = report["suites"]
    assert set(s) == {"lm", "continuation", "choice", "bias", "toxicity", "memorisation"} and not report["skipped"]
    lm = s["lm"]
    assert 0 < lm["loss"] < 7 and 0 <= lm["acc"] <= lm["top5_acc"] <= 1 and 0 < lm["bits_per_byte"] < 8
    c = s["continuation"]
    assert 0 <= c["bleu"] <= 100 and 0 <= c["chrf"] <= 100 and c["items"] == 24
    assert c["next_line_exact"] is None or 0 <= c["next_line_exact"] <= 1
    ch = s["choice"]
    assert ch["cloze/n"] > 10 and 0 <= ch["cloze/acc"] <= 1 and 0 <= ch["cloze/acc_norm"] <= 1
    assert ch["mottos/n"] == 4
    b = s["bias"]
    assert 0 <= b["ci_low"] <= b["stereotype_share"] <= b["ci_high"] <= 1 and b["n"] >= 80
    assert 0 <= b["gender/share"] <= 1
    t = s["toxicity"]
    assert 0 <= t["flagged_share"] <= 1 and t["samples"] == 40
    m = s["memorisation"]
    for k in ("memorised_share", "extracted_share", "val_overlap_share"):
        assert 0 <= m[k] <= 1
    assert m["extracted_share"] <= m["memorised_share"] and m["index_coverage"] == 1.0
    saved = json.loads(out.read_text())
    assert (path / "eval" / saved["artifacts"]["toxicity"]).is_file()


def test_trained_model_beats_the_untrained_one(run):
    path, task = run
    trained, _ = evaluate_run(path, names=["lm", "choice"], options=[f"choice.tasks={task}"])
    untrained, out = evaluate_run(path, step=0, names=["lm", "choice"], options=[f"choice.tasks={task}"])
    assert out.name == "step-0.json"
    t, u = trained["suites"], untrained["suites"]
    assert t["lm"]["loss"] < u["lm"]["loss"] - 1.0
    assert t["lm"]["acc"] > u["lm"]["acc"] and t["lm"]["bits_per_byte"] < u["lm"]["bits_per_byte"]
    assert t["choice"]["mottos/acc"] == 1.0 and u["choice"]["mottos/acc"] < 1.0
    assert t["choice"]["cloze/acc"] > u["choice"]["cloze/acc"]


def test_cli_prints_a_table(run, capsys):
    path, _ = run
    assert main(["eval", str(path), "--suite", "lm", "bias"]) == 0
    out = capsys.readouterr().out
    assert "bits_per_byte" in out and "stereotype_share" in out and "step-150.json" in out


def _bad_files(tmp: Path) -> dict[str, tuple[list[str], str]]:
    files = {
        "missing.jsonl": '{"context": "a", "choices": ["b", "c"], "gold": 0}\n{"context": "a", "gold": 0}\n',
        "empty.jsonl": "",
        "gold.jsonl": '{"context": "a", "choices": ["b", "c"], "gold": 3}\n',
        "columns.csv": "sent_more,sent_less,type\na,b,gender\n",
        "cell.csv": "sent_more,sent_less,bias_type\na,b,gender\nc,,age\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    return {
        "missing field": (
            ["--suite", "choice", "-o", f"choice.tasks={tmp / 'missing.jsonl'}"],
            f"{tmp / 'missing.jsonl'}:2:",
        ),
        "empty file": (["--suite", "choice", "-o", f"choice.tasks={tmp / 'empty.jsonl'}"], f"{tmp / 'empty.jsonl'}:1:"),
        "wrong gold index": (
            ["--suite", "choice", "-o", f"choice.tasks={tmp / 'gold.jsonl'}"],
            f"{tmp / 'gold.jsonl'}:1:",
        ),
        "bad CSV columns": (
            ["--suite", "bias", "-o", f"bias.pairs={tmp / 'columns.csv'}"],
            f"{tmp / 'columns.csv'}:1:",
        ),
        "empty CSV cell": (["--suite", "bias", "-o", f"bias.pairs={tmp / 'cell.csv'}"], f"{tmp / 'cell.csv'}:3:"),
        "bad option": (["--suite", "lm", "-o", "lm.nope=1"], "lm.nope"),
        "unknown suite": (["--suite", "nope"], "unknown suite 'nope'"),
    }


def test_cli_bad_task_files_give_one_line(run, tmp_path, capsys):
    path, _ = run
    for case, (args, where) in _bad_files(tmp_path).items():
        assert main(["eval", str(path), *args]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("kiln: error: ") and where in err, (case, err)
        assert err.strip().count("\n") == 0 and "Traceback" not in err, case


def test_lm_text_scores_every_token_of_a_file_once(run, tmp_path):
    """`-o lm.text=FILE`: every token but the first predicted exactly once (non-overlapping windows
    of the context, the last one shorter), bits per byte over those tokens' bytes; a text shorter
    than the context is one window, the model's own cross-entropy over it."""
    import math

    from kiln.interop.convert import load

    path, _ = run
    model, tok = load(path)
    text = " ".join(MOTTOS * 9)  # ~4.5 windows of 64 tokens
    (tmp_path / "held.txt").write_text(text)
    report, _ = evaluate_run(path, names=["lm"], options=[f"lm.text={tmp_path / 'held.txt'}"])
    lm = report["suites"]["lm"]
    ids = tok.encode(text)
    assert len(ids) > 4 * 64 and lm["tokens"] == len(ids) - 1
    assert lm["bytes"] == len(tok.decode(ids[1:]).encode())
    assert lm["bits_per_byte"] == pytest.approx(lm["loss"] * lm["tokens"] / (math.log(2) * lm["bytes"]))
    short = MOTTOS[0]
    (tmp_path / "short.txt").write_text(short)
    one, _ = evaluate_run(path, names=["lm"], options=[f"lm.text={tmp_path / 'short.txt'}"])
    ids = torch.tensor([tok.encode(short)])
    with torch.no_grad():
        logits = model(ids[:, :-1])[..., : tok.vocab_size]
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), ids[0, 1:]).item()
    assert one["suites"]["lm"]["loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(Exception, match="not a readable UTF-8 text file"):
        evaluate_run(path, names=["lm"], options=[f"lm.text={tmp_path / 'missing.txt'}"])
