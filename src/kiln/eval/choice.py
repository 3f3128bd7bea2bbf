"""The `choice` suite: zero-shot multiple choice scored by log-likelihood.

Task files are JSONL, one question a line, in the shape HellaSwag-, PIQA- and ARC-style
benchmarks reduce to:

    {"context": "The cat sat on the", "choices": ["mat.", "theorem."], "gold": 0}

(`ctx`/`query`/`question`/`goal` are accepted for `context`, `endings`/`options` for `choices`,
`label`/`answer` for `gold`; ARC's and PIQA's record shapes are recognised.) Each choice is
appended to the context — with a space between them unless one side already has whitespace
there — and scored by the summed log-likelihood of its tokens (`acc`) and by that sum divided
by its length in UTF-8 bytes (`acc_norm`, which does not favour short choices).

Every run also gets a cloze task built from its own held-out split: the true next line after a
few lines of context, among distractor lines drawn from other held-out documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.eval.common import documents, read_jsonl, task_error, token_logprobs
from kiln.eval.suites import EvalContext, SuiteResult, register_suite

CONTEXT_KEYS = ("context", "ctx", "query", "question", "goal")
CHOICE_KEYS = ("choices", "endings", "options")
GOLD_KEYS = ("gold", "label", "answer")


@dataclass
class Question:
    context: str
    choices: list[str]
    gold: int


def _field(obj: dict, keys: tuple[str, ...], path: Path | str, line: int):
    for k in keys:
        if k in obj:
            return obj[k]
    names = " / ".join(f"'{k}'" for k in keys)
    raise task_error(path, line, f"missing field {names}; each line needs context, choices and gold")


def _reshape(obj: dict, path: Path | str, line: int) -> dict:
    """ARC's {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} and PIQA's
    {"goal", "sol1", "sol2", "label"} in the common shape."""
    q = obj.get("question")
    if isinstance(q, dict) and "stem" in q:
        choices = found if isinstance(found := q.get("choices"), list) else []
        labels = [str(c.get("label")) for c in choices if isinstance(c, dict)]
        key = str(obj.get("answerKey", ""))
        if key not in labels:
            raise task_error(path, line, f"answerKey {key!r} is not one of the choice labels {labels}")
        return {"context": q["stem"], "choices": [c.get("text") for c in choices], "gold": labels.index(key)}
    if "sol1" in obj and "sol2" in obj:
        return {
            "context": obj.get("goal", ""),
            "choices": [obj["sol1"], obj["sol2"]],
            **{k: obj[k] for k in GOLD_KEYS if k in obj},
        }
    return obj


def load_questions(path: str | Path) -> list[Question]:
    """Read and check a JSONL multiple-choice file; a bad line is a one-line KilnError."""
    out = []
    for line, obj in read_jsonl(path, "question"):
        obj = _reshape(obj, path, line)
        context = _field(obj, CONTEXT_KEYS, path, line)
        choices = _field(obj, CHOICE_KEYS, path, line)
        gold = _field(obj, GOLD_KEYS, path, line)
        if not isinstance(context, str):
            raise task_error(path, line, f"the context must be a string, got {type(context).__name__}")
        if not isinstance(choices, list) or len(choices) < 2:
            raise task_error(path, line, "choices must be a list of at least two strings")
        for c in choices:
            if not isinstance(c, str) or not c.strip():
                raise task_error(path, line, f"every choice must be a non-empty string, got {c!r}")
        if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
            gold = int(gold)
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise task_error(path, line, f"gold must be the index of the right choice (an integer), got {gold!r}")
        if not 0 <= gold < len(choices):
            raise task_error(
                path, line, f"gold index {gold} is out of range for {len(choices)} choices (0 to {len(choices) - 1})"
            )
        out.append(Question(context, choices, gold))
    return out


def _join(context: str, choice: str) -> str:
    """The text appended to the context for this choice (with a separating space if needed)."""
    if not context or context[-1].isspace() or choice[:1].isspace():
        return choice
    return " " + choice


def score_questions(ctx: EvalContext, questions: list[Question]) -> dict[str, float]:
    """Accuracy by summed and by byte-normalised log-likelihood, and the chance level."""
    tok = ctx.tokenizer
    items, n_bytes = [], []
    for q in questions:
        c_ids = [tok.eos_id] + tok.encode(q.context)  # documents start after an EOS, as in training
        for choice in q.choices:
            text = _join(q.context, choice)
            items.append((c_ids, tok.encode(text)))
            n_bytes.append(max(len(text.encode("utf-8")), 1))
    lps = token_logprobs(ctx, items)
    correct = correct_norm = 0
    k = 0
    for q in questions:
        n = len(q.choices)
        sums = np.array([lps[k + j].sum() for j in range(n)])
        norm = sums / np.array(n_bytes[k : k + n])
        correct += int(np.argmax(sums) == q.gold)
        correct_norm += int(np.argmax(norm) == q.gold)
        k += n
    n_q = max(len(questions), 1)
    return {
        "acc": correct / n_q,
        "acc_norm": correct_norm / n_q,
        "n": len(questions),
        "chance": float(np.mean([1 / len(q.choices) for q in questions])) if questions else 0.0,
    }


def build_cloze(
    ctx: EvalContext, n_items: int, n_choices: int, context_lines: int = 6, max_docs: int = 2000
) -> list[Question]:
    """Next-line cloze questions from the held-out split: the line that follows some lines of a
    held-out document, among `n_choices - 1` different lines drawn from other documents."""
    rng = random.Random(ctx.seed)
    held_out = documents(ctx.data, "val")
    if len(held_out) > max_docs:
        held_out = [held_out[i] for i in sorted(rng.sample(range(len(held_out)), max_docs))]
    docs = [ctx.tokenizer.decode(d.tolist()).split("\n") for d in held_out]
    pool: list[tuple[int, str]] = []  # (document, line) of every substantial distinct line
    seen = set()
    for d, lines in enumerate(docs):
        for line in lines:
            if len(line.strip()) >= 4 and line.strip() not in seen:
                seen.add(line.strip())
                pool.append((d, line))
    candidates = [
        (d, i)
        for d, lines in enumerate(docs)
        for i in range(1, len(lines))
        if len(lines[i].strip()) >= 4 and "".join(lines[max(0, i - context_lines) : i]).strip()
    ]
    rng.shuffle(candidates)
    out: list[Question] = []
    for d, i in candidates:
        if len(out) >= n_items:
            break
        true = docs[d][i]
        picked: list[str] = []
        for attempt in range(50 * n_choices):  # distinct lines, from other documents if possible
            dd, line = pool[rng.randrange(len(pool))]
            other_doc = dd != d or attempt >= 25 * n_choices
            if other_doc and line.strip() != true.strip() and all(line.strip() != q.strip() for q in picked):
                picked.append(line)
                if len(picked) == n_choices - 1:
                    break
        if len(picked) < n_choices - 1:
            continue
        gold = rng.randrange(n_choices)
        picked.insert(gold, true)
        out.append(Question("\n".join(docs[d][max(0, i - context_lines) : i]) + "\n", picked, gold))
    return out


@register_suite("choice", options={"tasks": [], "cloze": True, "cloze_items": 100, "cloze_choices": 4, "limit": 0})
def choice_suite(ctx: EvalContext) -> SuiteResult:
    """Zero-shot multiple choice (JSONL tasks and a held-out next-line cloze): acc and acc_norm."""
    o = ctx.options
    tasks: dict[str, list[Question]] = {}
    for path in o["tasks"]:  # read every file first: a bad one fails before any scoring
        name = Path(path).stem
        while name in tasks or name == "cloze":
            name += "_"
        tasks[name] = load_questions(path)
    if o["cloze"]:
        tasks = {"cloze": build_cloze(ctx, o["cloze_items"], max(2, o["cloze_choices"])), **tasks}
    metrics: dict[str, float] = {}
    notes = {}
    for name, questions in tasks.items():
        if o["limit"]:
            questions = questions[: o["limit"]]
        if not questions:
            notes[name] = "no questions (the held-out split has too few distinct lines)"
            metrics[f"{name}/n"] = 0
            continue
        metrics.update({f"{name}/{k}": v for k, v in score_questions(ctx, questions).items()})
    return SuiteResult(metrics, {"notes": notes} if notes else {})
