"""Expected memory per rank for a layout, printed at start-up so users see why a run will not
fit before it runs out of memory.

Parameters, gradients and AdamW's two moments are fp32 and divided by the shards that hold
them (FSDP x TP x PP). Activations come from the family's `ModelSpec.activation_bytes` (for the
transformer, Korthikanti et al. 2022), divided by tp under sequence parallelism, shrunk to the
block inputs by activation checkpointing, and multiplied by the micro-batches a 1F1B pipeline
keeps in flight; plus the fp32 logits for the loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kiln.config import Config
from kiln.model.spec import ModelSpec, padded_vocab
from kiln.parallel.mesh import ParallelDims

GiB = 2**30


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float | None  # None: the family gives no activation estimate

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + (self.activations or 0.0)

    def describe(self) -> str:
        act = "unknown for this family" if self.activations is None else f"~{self.activations / GiB:.2f}"
        return (
            f"expected memory per rank: parameters {self.params / GiB:.2f} GiB, gradients {self.grads / GiB:.2f}, "
            f"optimizer {self.optimizer / GiB:.2f}, activations {act}; total ~{self.total / GiB:.2f} GiB"
        )


def estimate_memory(
    cfg: Config, spec: ModelSpec, vocab_size: int, dims: ParallelDims, precision: str
) -> MemoryEstimate:
    m = cfg.model
    vocab = padded_vocab(vocab_size)
    shards = dims.dp_shard * dims.tp * dims.pp
    n = spec.params(m, vocab) / shards
    micro = cfg.train.micro_batch_size or cfg.global_batch // dims.dp_size
    if dims.pp > 1:
        micro = max(1, cfg.global_batch // dims.dp_size // cfg.parallel.pp_microbatches)
    activations = None
    if spec.activation_bytes is not None:
        act_bytes = 2 if precision == "bf16" else 4
        per_block = spec.activation_bytes(m, micro, act_bytes)
        ac = cfg.parallel.activation_checkpoint
        per_layer = {"full": per_block.inputs, "selective": (per_block.stored + per_block.inputs) / 2}.get(
            ac, per_block.stored
        ) / dims.tp
        in_flight = min(dims.pp, cfg.parallel.pp_microbatches) if dims.pp > 1 else 1
        logits = micro * m.seq_len * vocab * (4 + act_bytes)
        activations = per_layer * m.n_layers / dims.pp * in_flight + logits
    return MemoryEstimate(params=4 * n, grads=4 * n, optimizer=8 * n, activations=activations)


def device_memory_bytes(device: torch.device) -> float:
    """Memory one rank may use: the GPU's, or on CPU the machine's shared by its local ranks."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0
    return total / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def resolve_grad_sync(
    cfg: Config, spec: ModelSpec, vocab_size: int, dims: ParallelDims, precision: str, device: torch.device
) -> str:
    """`parallel.grad_sync`, with "auto" decided by memory: reducing gradients only on a step's last
    micro-batch saves (micro-batches - 1) reduce-scatters a step but keeps every gradient unsharded
    until then, (dp_shard - 1) x the sharded gradients more; chosen when that still fits in 80% of
    the device's memory by the estimate above."""
    if cfg.parallel.grad_sync != "auto":
        return cfg.parallel.grad_sync
    if dims.dp_shard == 1 or dims.pp > 1:  # nothing sharded; a pipeline schedule reduces once anyway
        return "every_microbatch"
    estimate = estimate_memory(cfg, spec, vocab_size, dims, precision)
    if estimate.activations is None:  # the family gives no activation estimate: do not gamble
        return "every_microbatch"
    unsharded = estimate.grads * (dims.dp_shard - 1)
    fits = estimate.total + unsharded <= 0.8 * device_memory_bytes(device)
    return "last_microbatch" if fits else "every_microbatch"
