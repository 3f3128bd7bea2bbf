"""One plugin file registering one of each pluggable part, for tests/integration/test_plugins.py:
a corpus, a model family, an evaluation suite and a callback."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from kiln.data.corpora import CorpusFile, register_corpus
from kiln.eval.suites import register_suite
from kiln.model.registry import ModelSpec, register_model_family
from kiln.train.callbacks import Callback, register_callback


@register_corpus("counting")
def counting_corpus(cfg):
    """Text files written on first use into the folder KILN_TEST_CORPUS names."""
    folder = Path(os.environ["KILN_TEST_CORPUS"])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        path = folder / f"count{i:02d}.txt"
        if not path.exists():
            path.write_text("".join(f"{n} plus one is {n + 1}.\n" for n in range(i, i + 60)))
    return [CorpusFile(p, cfg.text_field) for p in sorted(folder.glob("*.txt"))]


class ConvLM(nn.Module):
    """A tiny causal language model: embedding, a left-padded convolution over 3 tokens, head."""

    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, cfg.d_model)
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.d_model, vocab_size)

    def forward(self, tokens):
        x = self.emb(tokens).transpose(1, 2)  # (B, d, T)
        x = self.conv(nn.functional.pad(x, (2, 0)))  # sees tokens t-2..t only
        return self.out(self.drop(torch.relu(x)).transpose(1, 2))


register_model_family(ModelSpec(name="conv", build=ConvLM, monitor_modules=("conv",)))


@register_suite("vocab-size")
def vocab_suite(ctx):
    """The tokenizer's vocabulary size (a suite needs nothing more than a function)."""
    return {"vocab": ctx.vocab_size}


@register_callback("count_steps")
class CountSteps(Callback):
    """Counts steps across checkpoints and records the count as a metric."""

    def __init__(self, options=None):
        super().__init__(options)
        self.count = 0

    def on_step_end(self, trainer, result):
        self.count += 1
        trainer.record_metric("plugin/count", self.count, "max")

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]
