"""Captions generated for held-out images: the image-text model's counterpart of text samples.

Each sample of a validation window is cut after its last image (BOS, the image's patches, any
text before it); the model then continues greedily until the end-of-text token, and the result
is shown beside the caption the data holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from kiln.data.multimodal.loader import DOC, PATCH, TOKEN, pixels_of


@torch.no_grad()
def caption_samples(
    model: nn.Module,
    window: torch.Tensor,
    tokenizer,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    n: int = 4,
    max_tokens: int = 16,
    context: int | None = None,
) -> list[dict[str, str]]:
    """Up to `n` {"prompt", "text", "reference"} from the samples of one window record (T, C);
    the model sees at most the last `context` positions (default: the window's length - 1)."""
    context = context or window.shape[0] - 1
    was_training = model.training
    model.eval()
    out = []
    try:
        for slot in range(n):
            rows = window[window[:, DOC] == slot]
            images = (rows[:, PATCH] >= 0).nonzero().flatten()
            real = bool(len(images))
            # Every call does the same n * max_tokens forwards, whatever the window holds and
            # wherever EOS comes: under FSDP all ranks must run their forwards in lockstep.
            cut = int(images[-1]) + 1 if real else 1
            record = (rows if real else window)[:cut].clone()
            reference = [int(t) for t in rows[cut:, TOKEN] if int(t) != tokenizer.eos_id]
            new: list[int] = []
            done = False
            for _ in range(max_tokens):
                x = record[-context:].to(device)[None]  # a long prompt slides: the model's positions end at context
                with autocast():
                    logits = model(
                        x[..., TOKEN].long(),
                        patches=pixels_of(x),
                        patch_index=x[..., PATCH].long(),
                        documents=torch.zeros_like(x[..., DOC]),
                    )
                token = int(logits[0, -1, : tokenizer.vocab_size].float().argmax())
                done = done or token == tokenizer.eos_id
                if not done:
                    new.append(token)
                step = torch.zeros(1, record.shape[1], dtype=record.dtype)
                step[0, TOKEN], step[0, PATCH] = token, -1
                record = torch.cat([record, step])
            if real:
                out.append(
                    {
                        "prompt": f"<validation image, sample {slot}>",
                        "text": tokenizer.decode(new),
                        "reference": tokenizer.decode(reference),
                    }
                )
    finally:
        model.train(was_training)
    return out
