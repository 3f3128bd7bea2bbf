"""Kiln: pretrain language models, from raw text to an evaluated model, on one CPU or many GPUs."""

from kiln.version import __version__  # noqa: F401


def load(path, step=None):
    """`model, tokenizer = kiln.load(PATH)`: a Kiln run (newest valid checkpoint, or `step`) or a
    Hugging Face Llama / Qwen3 / GPT-2 / BERT folder; `model(ids)` gives float32 logits (batch, time,
    vocabulary) on the CPU, `tokenizer.encode` / `decode` convert text."""
    from kiln.interop.convert import load as _load

    return _load(path, step)
