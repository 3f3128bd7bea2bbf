"""Filling masks with an encoder: what an encoder shows in place of generated text.

`fill_mask_demo` is the end-of-training sample of a masked run (a held-out window masked as the
evaluation masks it, with the model's guesses); `fill_prompt` serves `kiln sample` on an
encoder run, filling each `<|mask|>` of a prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from kiln.data.tokenizer import MASK, KilnTokenizer
from kiln.errors import KilnError
from kiln.objectives import EVAL_STEP, IGNORE, Objective


@torch.no_grad()
def _predict(
    model: nn.Module, inputs: torch.Tensor, vocab_size: int, autocast: Callable[[], contextlib.AbstractContextManager]
) -> torch.Tensor:
    """Most likely token at every position of `inputs` (B, T), one forward pass."""
    was_training = model.training
    model.eval()
    with autocast():
        logits = model(inputs)
    model.train(was_training)
    return logits[..., :vocab_size].argmax(-1)  # never a padding row of the embedding


def fill_mask_demo(
    model: nn.Module,
    window: torch.Tensor,
    objective: Objective,
    tokenizer: KilnTokenizer,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    seed: int = 0,
    max_tokens: int = 96,
) -> dict[str, str]:
    """Window 0 of the evaluation, masked as the evaluation masks it; the first `max_tokens`
    tokens rendered with `[original→predicted]` at each masked position."""
    batch = objective.make_batch(window[None], step=EVAL_STEP, seed=seed)
    predicted = _predict(model, batch.inputs.to(device), objective.vocab_size, autocast)[0].cpu()
    tokens, targets = window[:max_tokens].tolist(), batch.targets[0, :max_tokens]
    parts, run, hits, n = [], [], 0, 0
    for i, tok in enumerate(tokens[: len(targets)]):
        if targets[i] == IGNORE:
            run.append(tok)
            continue
        guess = int(predicted[i])
        hits, n = hits + (guess == tok), n + 1
        parts += [tokenizer.decode(run), f"[{tokenizer.decode([tok])}→{tokenizer.decode([guess])}]"]
        run = []
    parts.append(tokenizer.decode(run))
    return {
        "prompt": f"fill-mask on a held-out window: [original→predicted], {hits} of {n} right",
        "text": "".join(parts),
    }


def fill_prompt(
    model: nn.Module,
    tokenizer: KilnTokenizer,
    prompt: str,
    context: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> str:
    """`prompt` with each `<|mask|>` replaced by the model's guess, shown in brackets."""
    ids = tokenizer.encode(prompt)
    if tokenizer.mask_id not in ids:
        raise KilnError(
            f"an encoder fills masks rather than continuing text: put {MASK} in the prompt, "
            f"e.g. --prompt 'def {MASK}(self):'"
        )
    if len(ids) > context:
        raise KilnError(f"the prompt is {len(ids)} tokens, longer than the model's context of {context}")
    predicted = _predict(model, torch.tensor([ids], device=device), tokenizer.vocab_size, autocast)[0].tolist()
    parts: list[str] = []
    run: list[int] = []
    for tok, guess in zip(ids, predicted):
        if tok == tokenizer.mask_id:
            parts += [tokenizer.decode(run), f"[{tokenizer.decode([guess])}]"]
            run = []
        else:
            run.append(tok)
    parts.append(tokenizer.decode(run))
    return "".join(parts)
