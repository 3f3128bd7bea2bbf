"""Small builders shared by the evaluation-suite tests: a tokenizer, a tiny model, a context."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kiln.config import Config, load_config
from kiln.data.tokenizer import KilnTokenizer, train_tokenizer
from kiln.eval.suites import EvalContext
from kiln.model.registry import build_model, initialise

MEMORISED = "the quick brown fox jumps over the lazy dog while the small cat sleeps on the warm mat.\n"
OTHER = "code flows through shards and loaders; a trainer writes checkpoints.\n"


def tokenizer(texts: list[str] | None = None) -> KilnTokenizer:
    return train_tokenizer((texts or [MEMORISED, OTHER]) * 20, 300)


def config(tmp_path: Path, *extra: str) -> Config:
    return load_config(
        preset="tiny",
        overrides=[
            f"data.corpus={tmp_path / 'corpus'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.vocab_size=300",
            "model.n_layers=1",
            "model.d_model=32",
            "model.n_heads=2",
            "model.seq_len=32",
            "train.batch_size=8",
            "train.device=cpu",
            "train.precision=fp32",
            *extra,
        ],
    )


def model(cfg: Config, tok: KilnTokenizer, seed: int = 0) -> nn.Module:
    m = build_model(cfg.model, tok.vocab_size)
    initialise(m, cfg.model, seed)
    return m.eval()


def context(cfg: Config, m: nn.Module, tok: KilnTokenizer, **kw) -> EvalContext:
    return EvalContext(cfg, m, tok, torch.device("cpu"), **kw)


def memorise(cfg: Config, tok: KilnTokenizer, text: str = MEMORISED, steps: int = 60) -> nn.Module:
    """A tiny decoder trained until it has learnt `text` (repeated, after an EOS) by heart."""
    torch.manual_seed(0)
    m = model(cfg, tok).train()
    stream = ([tok.eos_id] + tok.encode(text)) * 8
    T = cfg.model.seq_len
    windows = torch.tensor([stream[i : i + T + 1] for i in range(0, len(stream) - T - 1, 7)])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = m(windows[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


class ForcedModel(nn.Module):
    """A stand-in model that always predicts the token `token_id` (logits: 0 elsewhere)."""

    def __init__(self, vocab_size: int, token_id: int):
        super().__init__()
        self.vocab_size, self.token_id = vocab_size, token_id
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        logits[..., self.token_id] = 50.0
        return logits
