"""The `continuation` suite: continue held-out passages and compare with what really followed.

Passages are cut at line breaks of held-out documents: the model sees `prompt_tokens` tokens
ending at a line break and greedily generates `new_tokens` more. Generations are scored against
the true continuations (same length in tokens) with corpus BLEU and chrF (`sacrebleu`, default
settings), and by exact match of the next line (counted over passages whose true next line ends
within `new_tokens` tokens).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from kiln.eval.common import cut_at, documents, generate_batched
from kiln.eval.suites import EvalContext, SuiteResult, register_suite

MAX_DOCS = 2000  # held-out documents sampled to draw passages from


def score_generations(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100), and the exact-match rate of the first line."""
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score if hypotheses else 0.0
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score if hypotheses else 0.0
    lines = [(h, r) for h, r in zip(hypotheses, references) if "\n" in r]
    exact = sum(next_line(h) == next_line(r) and "\n" in h for h, r in lines)
    return {
        "bleu": bleu,
        "chrf": chrf,
        "next_line_exact": exact / len(lines) if lines else float("nan"),
        "next_line_items": len(lines),
    }


def next_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


def line_break_cuts(docs: list[np.ndarray], tokenizer, prompt_tokens: int) -> list[tuple[int, int]]:
    """(document, token index) where a line starts, with `prompt_tokens` tokens before it."""
    vocab = np.unique(np.concatenate(docs)) if docs else np.zeros(0, np.int64)
    newline = np.zeros(int(vocab.max()) + 1 if len(vocab) else 1, dtype=bool)
    for i in vocab.tolist():
        newline[i] = "\n" in tokenizer.decode([i])
    out: list[tuple[int, int]] = []
    for d, ids in enumerate(docs):
        where = np.flatnonzero(newline[ids[:-1]]) + 1  # the token after one holding a line break
        out.extend((d, int(j)) for j in where if j >= prompt_tokens)
    return out


@register_suite("continuation", generates=True, options={"items": 50, "prompt_tokens": 32, "new_tokens": 32})
def continuation_suite(ctx: EvalContext) -> SuiteResult:
    """Greedy continuations of held-out passages scored with BLEU, chrF and next-line exact match."""
    o = ctx.options
    P = max(1, min(o["prompt_tokens"], ctx.seq_len - 1))
    C = max(1, o["new_tokens"])
    tok = ctx.tokenizer
    rng = random.Random(ctx.seed)
    docs = documents(ctx.data, "val")
    if len(docs) > MAX_DOCS:
        docs = [docs[i] for i in sorted(rng.sample(range(len(docs)), MAX_DOCS))]
    cuts = line_break_cuts(docs, tok, P)
    rng.shuffle(cuts)
    chosen: list[tuple[int, int, str]] = []
    for d, j in cuts:
        if len(chosen) >= o["items"]:
            break
        reference = tok.decode(docs[d][j : j + C].tolist())
        if next_line(reference).strip():  # skip cuts before blank lines
            chosen.append((d, j, reference))
    if not chosen:
        return SuiteResult(skipped=f"no held-out line break has {P} tokens before it")
    prompts = torch.from_numpy(np.stack([docs[d][j - P : j].astype(np.int64) for d, j, _ in chosen]))
    generated = generate_batched(ctx, prompts, C, temperature=0.0)
    hyps = [tok.decode(cut_at(row, tok.eos_id)) for row in generated.tolist()]
    refs = [r for _, _, r in chosen]
    metrics = score_generations(hyps, refs)
    metrics["items"] = len(chosen)
    examples = [
        {"prompt": tok.decode(p.tolist()), "reference": r, "generated": h} for p, r, h in zip(prompts[:20], refs, hyps)
    ]
    return SuiteResult(metrics, {"examples": examples})
