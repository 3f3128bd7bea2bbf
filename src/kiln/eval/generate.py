"""Sampling from a causal model: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import torch
from torch import nn


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
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, context: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, vocab_size: int | None = None, stop_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend `prompt` (1-D ids) by up to `max_new_tokens`; temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    ids = prompt.clone()
    for _ in range(max_new_tokens):
        logits = model(ids[-context:][None])[0, -1].float()
        if vocab_size is not None:
            logits = logits[:vocab_size]  # never sample the embedding's padding rows
        if temperature == 0:
            nxt = logits.argmax()
        else:
            # sample on the CPU: the generator is a CPU one, whatever device the model runs on
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator)[0]
        ids = torch.cat([ids, nxt.view(1).to(ids.device)])
        if stop_id is not None and int(nxt) == stop_id:
            break
    model.train(was_training)
    return ids
