"""Expected memory per rank for a layout, printed at start-up so users see why a run will not
fit before it runs out of memory.

Parameters, gradients and AdamW's two moments are fp32 and divided by the shards that hold
them (FSDP x TP x PP). Activations follow Korthikanti et al. (2022): about 34*s*b*h bytes per
layer at 16-bit with fused attention (no s^2 term), divided by tp under sequence parallelism,
shrunk to the block inputs by activation checkpointing, and multiplied by the micro-batches a
1F1B pipeline keeps in flight; plus the fp32 logits for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import Config
from kiln.parallel.mesh import ParallelDims
from kiln.scaling.flops import model_params

GiB = 2**30


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"expected memory per rank: parameters {self.params / GiB:.2f} GiB, gradients {self.grads / GiB:.2f}, "
                f"optimizer {self.optimizer / GiB:.2f}, activations ~{self.activations / GiB:.2f}; "
                f"total ~{self.total / GiB:.2f} GiB")


def estimate_memory(cfg: Config, vocab_size: int, dims: ParallelDims, precision: str) -> MemoryEstimate:
    m = cfg.model
    shards = dims.dp_shard * dims.tp * dims.pp
    n = model_params(m, vocab_size) / shards
    micro = cfg.train.micro_batch_size or cfg.global_batch // dims.dp_size
    if dims.pp > 1:
        micro = max(1, cfg.global_batch // dims.dp_size // cfg.parallel.pp_microbatches)
    act_bytes = 2 if precision == "bf16" else 4
    per_layer = 34 / 2 * act_bytes * m.seq_len * micro * m.d_model / dims.tp
    ac = cfg.parallel.activation_checkpoint
    if ac == "full":
        per_layer = act_bytes * m.seq_len * micro * m.d_model / dims.tp
    elif ac == "selective":
        per_layer = (per_layer + act_bytes * m.seq_len * micro * m.d_model / dims.tp) / 2
    in_flight = min(dims.pp, cfg.parallel.pp_microbatches) if dims.pp > 1 else 1
    layers = m.n_layers / dims.pp
    logits = micro * m.seq_len * vocab_size * (4 + act_bytes)
    return MemoryEstimate(params=4 * n, grads=4 * n, optimizer=8 * n,
                          activations=per_layer * layers * in_flight + logits)
