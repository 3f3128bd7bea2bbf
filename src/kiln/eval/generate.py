"""Sampling from a causal model: temperature, top-k and nucleus (top-p) filtering, for one
prompt or a batch of equal-length prompts. Used by the end-of-run samples, `kiln sample` and the
generating evaluation suites."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

Autocast = Callable[[], contextlib.AbstractContextManager]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop[..., 0] = False  # always keep the most likely token (top_p = 0 is greedy)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: torch.Tensor,
    new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    autocast: Autocast = contextlib.nullcontext,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Extend equal-length prompts (B, P) by up to `new_tokens` tokens: (B, P + n). Temperature 0
    is greedy; sampling draws on the CPU from `generator`, whatever device the model runs on.
    With `stop_id`, generation ends early once every row has produced it. A fixed number of
    forward passes otherwise, so data-parallel ranks stay in step."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), prompts.device)
    ids = prompts.to(device)
    stopped = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    try:
        for _ in range(new_tokens):
            with autocast():
                logits = model(ids[:, -context:])[:, -1].float()
            if vocab_size is not None:
                logits = logits[:, :vocab_size]  # never sample the embedding's padding rows
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if stop_id is not None:
                stopped |= nxt == stop_id
                if bool(stopped.all()):
                    break
    finally:
        model.train(was_training)
    return ids


def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    autocast: Autocast = contextlib.nullcontext,
) -> torch.Tensor:
    """Extend one prompt (1-D ids) by up to `max_new_tokens` (ending after `stop_id`)."""
    return generate_batch(
        model,
        prompt[None],
        max_new_tokens,
        context,
        temperature,
        top_k,
        top_p,
        vocab_size,
        generator,
        autocast,
        stop_id,
    )[0]


def sample_prompts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_tokens: int,
    context: int,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop: bool = True,
) -> list[str]:
    """The decoded continuation of each text prompt (an empty prompt starts after EOS); with
    `stop`, each ends at the end-of-text token."""
    out = []
    for prompt in prompts:
        ids = torch.tensor(tokenizer.encode(prompt) or [tokenizer.eos_id], device=device)
        full = generate(
            model,
            ids,
            max_tokens,
            context,
            temperature,
            top_k,
            top_p,
            vocab_size=tokenizer.vocab_size,
            stop_id=tokenizer.eos_id if stop else None,
            generator=generator,
            autocast=autocast,
        )
        out.append(tokenizer.decode(full.tolist()))
    return out
