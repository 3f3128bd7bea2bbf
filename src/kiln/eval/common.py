"""What the evaluation suites share: held-out documents, log-likelihoods of continuations, batched
generation, the bytes each token stands for, confidence intervals, and one-line task-file errors.

Log-likelihoods: a causal decoder scores a continuation in one forward pass (log p(x_i | x_<i));
a bidirectional encoder gets the pseudo-log-likelihood of Salazar et al. (2020): each token of
the continuation is masked in turn and scored given everything else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.eval.generate import generate_batch
from kiln.eval.suites import EvalContext


def task_error(path: str | Path, line: int, message: str) -> KilnError:
    """The one-line error for a bad task file: `path:line: what is wrong`."""
    return KilnError(f"{path}:{line}: {message}")


def read_lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank, non-comment (#) line of a text file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KilnError(f"{what} file '{path}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise task_error(path, text_line_of(p.read_bytes(), e.start), f"not UTF-8 text ({e.reason})") from None
    out = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
    out = [(i, s) for i, s in out if s and not s.startswith("#")]
    if not out:
        raise task_error(path, 1, f"the file is empty; expected one {what} per line")
    return out


def text_line_of(data: bytes, offset: int) -> int:
    return data[:offset].count(b"\n") + 1


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise KilnError(f"{what} file '{path}' does not exist")
    out = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise task_error(path, i, f"not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # not a JSONDecodeError: e.g. an integer over Python's digit limit
                raise task_error(path, i, f"not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise task_error(path, i, f"expected a JSON object, got {type(obj).__name__}")
            out.append((i, obj))
    if not out:
        raise task_error(path, 1, f"the file is empty; expected one JSON object ({what}) per line")
    return out


# --------------------------------------------------------------------------- tokens and text


def documents(data, split: str) -> list[np.ndarray]:
    """The documents of a prepared split (token arrays; documents are separated by EOS)."""
    eos = data.tokenizer.eos_id
    out = []
    for shard in data.split(split):
        arr = np.asarray(shard)
        start = 0
        for end in np.flatnonzero(arr == eos).tolist() + [len(arr)]:
            if end > start:
                out.append(arr[start:end])
            start = end + 1
    return out


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0). Byte-level BPE tokens map one
    character to one byte, so the count is exact even for tokens holding part of a character."""
    from tokenizers import pre_tokenizers

    V = tokenizer.vocab_size
    out = np.zeros(V, dtype=np.int64)
    decoder = (json.loads(tokenizer.to_json()).get("decoder") or {}).get("type")
    alphabet = frozenset(pre_tokenizers.ByteLevel.alphabet()) if decoder == "ByteLevel" else frozenset()
    for i in range(V):
        if i in tokenizer.special_ids:
            continue
        piece = tokenizer.tok.id_to_token(i)
        if piece is None:
            continue
        if alphabet and all(c in alphabet for c in piece):
            out[i] = len(piece)
        else:
            out[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return out


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


# --------------------------------------------------------------------------- log-likelihoods


@torch.no_grad()
def token_logprobs(ctx: EvalContext, items: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
    """For each (context ids, continuation ids): the log-probability of every continuation token
    (natural log). The context is cut from the left to fit the model's window."""
    if ctx.is_encoder:
        return _pseudo_logprobs(ctx, items)
    T, V = ctx.seq_len, ctx.vocab_size
    seqs = []
    for c, x in items:
        x = list(x)[:T]
        seqs.append(((list(c) + x)[-(T + 1) :], len(x)))
    out: list[np.ndarray] = [np.zeros(0)] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(seqs[i][0]))
    pad = ctx.tokenizer.pad_id
    for chunk in batches(order, ctx.batch_size):
        L = max(len(seqs[i][0]) for i in chunk) - 1
        inputs = torch.full((len(chunk), L), pad, dtype=torch.long)
        targets = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, i in enumerate(chunk):
            s = seqs[i][0]
            inputs[r, : len(s) - 1] = torch.tensor(s[:-1])
            targets[r, : len(s) - 1] = torch.tensor(s[1:])
        with ctx.autocast():
            logits = ctx.model(inputs.to(ctx.device))
        lp = logits[..., :V].float().log_softmax(-1).gather(-1, targets.to(ctx.device)[..., None])[..., 0].cpu()
        for r, i in enumerate(chunk):
            s, k = seqs[i]
            out[i] = lp[r, len(s) - 1 - k : len(s) - 1].numpy().astype(np.float64)
    return out


def _pseudo_logprobs(ctx: EvalContext, items: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
    """Masked-LM pseudo-log-likelihood: one copy of the sequence per continuation token, with that
    token replaced by the mask; copies of equal length share a batch (no padding, which a
    bidirectional model would attend to)."""
    T, V, mask_id = ctx.seq_len, ctx.vocab_size, ctx.tokenizer.mask_id
    variants = []  # (item, position in continuation, sequence, index of the masked token, target)
    out = [np.zeros(min(len(x), T)) for _, x in items]
    for i, (c, x) in enumerate(items):
        x = list(x)[:T]
        s = (list(c) + x)[-T:]
        start = len(s) - len(x)
        for j in range(len(x)):
            variants.append((i, j, s, start + j, s[start + j]))
    variants.sort(key=lambda v: len(v[2]))
    groups: dict[int, list] = {}
    for v in variants:
        groups.setdefault(len(v[2]), []).append(v)
    for group in groups.values():
        for chunk in batches(group, ctx.batch_size):
            inputs = torch.tensor([v[2] for v in chunk], dtype=torch.long)
            rows = torch.arange(len(chunk))
            pos = torch.tensor([v[3] for v in chunk])
            inputs[rows, pos] = mask_id
            with ctx.autocast():
                logits = ctx.model(inputs.to(ctx.device))
            picked = logits[rows.to(ctx.device), pos.to(ctx.device), :V].float().log_softmax(-1).cpu()
            for r, (i, j, _, _, tgt) in enumerate(chunk):
                out[i][j] = float(picked[r, tgt])
    return out


# --------------------------------------------------------------------------- generation


def generate_tokens(
    ctx: EvalContext,
    prompts: torch.Tensor,
    new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend equal-length prompts (B, P) by exactly `new_tokens` tokens each: (B, new_tokens)."""
    full = generate_batch(
        ctx.model,
        prompts,
        new_tokens,
        ctx.seq_len,
        temperature,
        top_k,
        vocab_size=ctx.vocab_size,
        generator=generator,
        autocast=ctx.autocast,
    )
    return full[:, prompts.shape[1] :].cpu()


def generate_batched(ctx: EvalContext, prompts: torch.Tensor, new_tokens: int, **kw) -> torch.Tensor:
    return (
        torch.cat([generate_tokens(ctx, chunk, new_tokens, **kw) for chunk in prompts.split(max(1, ctx.batch_size))])
        if len(prompts)
        else torch.zeros((0, new_tokens), dtype=torch.long)
    )


def cut_at(ids: list[int], stop_id: int) -> list[int]:
    return ids[: ids.index(stop_id)] if stop_id in ids else ids


# --------------------------------------------------------------------------- statistics


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion `p` observed over `n` trials."""
    if n == 0:
        return math.nan, math.nan
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
