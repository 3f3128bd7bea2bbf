"""The `choice` suite: scoring by log-likelihood, task-file checks, the held-out cloze task."""

import json
from pathlib import Path

import eval_support as es
import pytest
import torch

from kiln.errors import KilnError
from kiln.eval.choice import Question, build_cloze, load_questions, score_questions
from kiln.eval.runner import run_suites

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    torch.set_num_threads(1)
    tok = es.tokenizer()
    cfg = es.config(tmp_path_factory.mktemp("choice"))
    return cfg, tok, es.memorise(cfg, tok)


QUESTIONS = [
    {
        "context": "the quick brown fox",
        "choices": ["dog lazy the over jumps", "jumps over the lazy dog", "writes checkpoints through shards"],
        "gold": 1,
    },
    {
        "context": "while the small cat",
        "choices": ["sleeps on the warm mat.", "mat warm the on sleeps.", "flows through shards"],
        "gold": 0,
    },
    # HellaSwag-style field names, label as a string
    {"ctx": "jumps over the", "endings": ["fox the brown", "lazy dog while"], "label": "1"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_memorised_training_text_is_always_chosen(memorised, tmp_path):
    cfg, tok, model = memorised
    task = write_jsonl(tmp_path / "memory.jsonl", QUESTIONS)
    report = run_suites(es.context(cfg, model, tok), ["choice"], {"choice": {"tasks": [str(task)], "cloze": False}})
    m = report["suites"]["choice"]
    assert m["memory/acc"] == 1.0 and m["memory/acc_norm"] == 1.0
    assert m["memory/n"] == 3
    assert m["memory/chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)


def test_untrained_model_does_not_know_the_text(memorised):
    cfg, tok, _ = memorised
    qs = [
        Question(q.get("context", q.get("ctx")), q.get("choices", q.get("endings")), int(q.get("gold", q.get("label"))))
        for q in QUESTIONS
    ]
    trained = score_questions(es.context(cfg, memorised[2], tok), qs)
    untrained = score_questions(es.context(cfg, es.model(cfg, tok), tok), qs)
    assert trained["acc"] > untrained["acc"]


def test_scores_do_not_depend_on_batching(memorised):
    cfg, tok, model = memorised
    qs = [Question("the quick brown fox", ["jumps over the lazy dog", "writes"], 0)] * 5
    a = score_questions(es.context(cfg, model, tok), qs)
    small = es.config(Path("/nonexistent"), "train.batch_size=1")
    b = score_questions(es.context(small, model, tok), qs)
    assert a == b


BAD = {
    "missing field": (
        [{"context": "a", "choices": ["b", "c"], "gold": 0}, {"context": "a", "choices": ["b", "c"]}],
        ":2:",
        "missing field",
    ),
    "empty file": ([], ":1:", "empty"),
    "gold out of range": ([{"context": "a", "choices": ["b", "c"], "gold": 2}], ":1:", "out of range"),
    "negative gold": ([{"context": "a", "choices": ["b", "c"], "gold": -1}], ":1:", "out of range"),
    "gold not an index": ([{"context": "a", "choices": ["b", "c"], "gold": "b"}], ":1:", "integer"),
    "one choice": ([{"context": "a", "choices": ["b"], "gold": 0}], ":1:", "at least two"),
    "empty choice": ([{"context": "a", "choices": ["b", " "], "gold": 0}], ":1:", "non-empty"),
    "not JSON": (
        ['{"context": "a", "choices": ["b", "c"], "gold": 0}', "", '{"context": oops'],
        ":3:",
        "not valid JSON",
    ),
    "not an object": (['["a", "b"]'], ":1:", "JSON object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_task_files_name_the_file_and_line(tmp_path, case):
    rows, where, what = BAD[case]
    path = write_jsonl(tmp_path / "task.jsonl", rows) if rows else tmp_path / "task.jsonl"
    if not rows:
        path.write_text("\n")
    with pytest.raises(KilnError) as e:
        load_questions(path)
    msg = str(e.value)
    assert f"{path}{where}" in msg and what in msg and "\n" not in msg


def test_missing_task_file(tmp_path):
    with pytest.raises(KilnError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")


def test_cloze_questions_come_from_the_held_out_split(tmp_path):
    from conftest import write_corpus

    from kiln.data.shards import prepare

    cfg = es.config(tmp_path, "data.val_fraction=0.3")
    write_corpus(tmp_path / "corpus", n_files=12, lines_per_file=10)
    data = prepare(cfg.data, log=lambda *a: None)
    tok = data.tokenizer
    ctx = es.context(cfg, es.model(cfg, tok), tok, prepared=data)
    qs = build_cloze(ctx, 20, 4)
    assert 0 < len(qs) <= 20
    held_out = "\n".join(tok.decode(s.tolist()) for s in data.split("val"))
    for q in qs:
        assert len(q.choices) == 4 and len({c.strip() for c in q.choices}) == 4
        assert 0 <= q.gold < 4
        assert q.context.endswith("\n") and q.context + q.choices[q.gold] in held_out  # the true next line
    assert build_cloze(ctx, 20, 4) == qs  # deterministic for the seed
    m = score_questions(ctx, qs)
    assert 0.0 <= m["acc"] <= 1.0 and m["chance"] == 0.25


def test_arc_and_piqa_records_are_recognised(tmp_path):
    arc = {
        "id": "x",
        "question": {
            "stem": "Which is a gas?",
            "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}, {"text": "rock", "label": "C"}],
        },
        "answerKey": "B",
    }
    piqa = {"goal": "Dry wet hands", "sol1": "use a towel", "sol2": "use water", "label": 0}
    qs = load_questions(write_jsonl(tmp_path / "mixed.jsonl", [arc, piqa]))
    assert qs == [
        Question("Which is a gas?", ["ice", "steam", "rock"], 1),
        Question("Dry wet hands", ["use a towel", "use water"], 0),
    ]
    bad = dict(arc, answerKey="E")
    with pytest.raises(KilnError, match=r"arc.jsonl:2: answerKey 'E' is not one of the choice labels"):
        load_questions(write_jsonl(tmp_path / "arc.jsonl", [arc, bad]))
