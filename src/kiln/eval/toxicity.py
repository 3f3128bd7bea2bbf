"""The `toxicity` suite: how often sampled continuations contain terms from a lexicon.

Each prompt is continued `samples` times (temperature sampling); a continuation is flagged when
its text (not the prompt's) contains a lexicon term as a whole word or phrase, case-insensitively.
Reported: the share of flagged continuations and the share of prompts with at least one. The
prompts and every flagged continuation, with the terms found, are saved for inspection in
`eval/step-N/toxicity.json`. A lexicon is a signal, not a classifier: it misses toxicity
without listed words and flags quoted or innocent uses.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

from kiln.eval.common import cut_at, generate_batched, read_jsonl, read_lines, task_error
from kiln.eval.suites import EvalContext, SuiteResult, register_suite


def _data(name: str) -> Path:
    return Path(str(resources.files("kiln.eval") / "data" / name))


def load_lexicon(path: str | Path) -> list[str]:
    """Terms, one a line ('#' comments); an empty list is a one-line KilnError."""
    return sorted({" ".join(line.lower().split()) for _, line in read_lines(path, "term")})


def load_prompts(path: str | Path) -> list[str]:
    """Prompts, one a line, or JSONL with a "prompt" field (text, or {"text": ...} as in
    RealToxicityPrompts)."""
    if str(path).endswith(".jsonl"):
        out = []
        for line, obj in read_jsonl(path, "prompt"):
            p = obj.get("prompt")
            p = p.get("text") if isinstance(p, dict) else p
            if not isinstance(p, str) or not p.strip():
                raise task_error(path, line, 'needs a "prompt" field holding text or {"text": ...}')
            out.append(p)
        return out
    return [line for _, line in read_lines(path, "prompt")]


def lexicon_pattern(terms: list[str]) -> re.Pattern:
    """One regex matching any term as a whole word or phrase (any whitespace between words)."""
    alts = sorted((r"\s+".join(re.escape(w) for w in t.split()) for t in terms), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


def flagged_terms(text: str, pattern: re.Pattern) -> list[str]:
    return sorted({" ".join(m.group(0).lower().split()) for m in pattern.finditer(text)})


@register_suite(
    "toxicity",
    generates=True,
    options={"lexicon": "", "prompts": "", "samples": 4, "new_tokens": 32, "temperature": 1.0, "top_k": 0},
)
def toxicity_suite(ctx: EvalContext) -> SuiteResult:
    """Share of sampled continuations containing lexicon terms (built-in list or your own)."""
    o = ctx.options
    lexicon_path = o["lexicon"] or _data("toxicity_lexicon.txt")
    prompts_path = o["prompts"] or _data("toxicity_prompts.txt")
    pattern = lexicon_pattern(load_lexicon(lexicon_path))
    prompts = load_prompts(prompts_path)
    tok = ctx.tokenizer
    assert ctx.seed is not None  # EvalContext fills it in (train.seed)
    gen = torch.Generator().manual_seed(ctx.seed)
    n_samples = max(1, o["samples"])
    flagged, hit_prompts, total = [], 0, 0
    for prompt in prompts:
        ids = torch.tensor([tok.eos_id] + tok.encode(prompt))[-ctx.seq_len :]
        out = generate_batched(
            ctx,
            ids.repeat(n_samples, 1),
            o["new_tokens"],
            temperature=o["temperature"],
            top_k=o["top_k"] or ctx.cfg.eval.top_k,
            generator=gen,
        )
        any_hit = False
        for row in out.tolist():
            text = tok.decode(cut_at(row, tok.eos_id))  # an EOS ends the continuation
            total += 1
            terms = flagged_terms(text, pattern)
            if terms:
                any_hit = True
                flagged.append({"prompt": prompt, "continuation": text, "terms": terms})
        hit_prompts += any_hit
    metrics = {
        "flagged_share": len(flagged) / max(total, 1),
        "prompts_flagged_share": hit_prompts / max(len(prompts), 1),
        "flagged": len(flagged),
        "samples": total,
    }
    artifacts = {"lexicon": str(lexicon_path), "prompts": prompts, "flagged": flagged}
    return SuiteResult(metrics, artifacts)
