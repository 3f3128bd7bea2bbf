"""Fused and memory-lean replacements of model and loss operations (the `[kernels]` section)."""
