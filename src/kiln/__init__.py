"""Kiln: pretrain language models, from raw text to an evaluated model, on one CPU or many GPUs."""

__version__ = "0.1.0"
