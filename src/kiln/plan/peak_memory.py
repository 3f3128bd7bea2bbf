"""Peak memory per rank of a layout: Kiln's one memory model. `kiln plan` prunes layouts with it,
and `kiln train` prints it at start-up and decides `parallel.grad_sync = "auto"` by it.

Static state, per rank: float32 parameters and gradients, and AdamW's two moments of the rank's
stage (the blocks of its pipeline stage, plus the embedding on the first stage and the head on the
last), divided by the FSDP shard count and by tp. The moments are 8 bytes a parameter, or under
`optim.name = "adamw8bit" | "adamw4bit"` torchao's codes and block scales (tensors under 4,096
values keep float32 moments). Expert parallelism needs no term of its own: it splits a dp_shard
group's experts, so a rank holds 1 / dp_shard of them either way.
Transient state under FSDP2: the gathered parameters of the block being computed and of the one
prefetched, and in backward their unsharded gradients before the reduce-scatter.
Activations are *measured*, not taken from a formula: one forward of the model with 1 and 2 blocks
under FakeTensorMode (no memory, no device) counts the bytes autograd saves, which gives a block's
and the rest's saved bytes per sequence for this exact model code and precision (the family's
`activation_bytes` formula where fake tensors cannot run the model). They scale with
the micro-batch, divide by tp (sequence parallelism; the gathered block inputs do not), shrink to
the block inputs under activation checkpointing (plus one block being recomputed), and are
multiplied by the micro-batches a pipeline schedule keeps in flight on its first stage. The loss
adds its float32 logits and their gradient (one chunk's with the chunked loss head).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from kiln.config import Config, ModelConfig
from kiln.model.spec import ModelSpec, padded_vocab
from kiln.plan.layout import Layout

if TYPE_CHECKING:
    from kiln.parallel.mesh import ParallelDims

GiB = 2**30
# torchao's low-bit AdamW: (bits per value, values per float32 scale, entries of the float32 code map)
LOW_BIT_STATES = {"adamw8bit": (8, 256, 256), "adamw4bit": (4, 128, 16)}


@dataclass(frozen=True)
class ModelFacts:
    """What the memory and time models need of a model, measured once per config."""

    n_layers: int
    block_params: int  # parameters of one block (the mean over the blocks)
    edge_params: int  # the rest: embeddings, final norm, head
    embed_params: int  # of which the input embedding (the first stage holds it)
    block_act: float  # bytes one block saves per sequence (no checkpointing)
    block_input: float  # bytes of a block's input per sequence
    edge_act: float  # bytes the rest saves per sequence (embeddings, final norm, head input)
    logits: float  # bytes of one sequence's float32 logits
    flops_per_seq: float  # training FLOPs per sequence
    edge_flops_share: float  # of which outside the blocks (the head, on the last pipeline stage)
    value_bytes: int  # bytes per activation value (4 fp32, 2 bf16)
    chunked_loss: int  # tokens per chunk with kernels.cross_entropy = chunked, else 0
    seq_len: int
    d_model: int
    optimizer_bytes: float = 8.0  # bytes of optimizer state per parameter (the mean over the tensors)
    activations_known: bool = True  # False: neither fake tensors nor the family's formula gave them


def optimizer_state_bytes(optimizer: str, numel: int) -> float:
    """Bytes of AdamW's two moments for one parameter tensor of `numel` values: float32, or for
    the low-bit optimizers torchao's codes, one scale per block and a code map each, where torchao
    quantises (at least 4,096 values, a whole number of blocks: torchao.optim._AdamBase._new_buffer)."""
    if optimizer in LOW_BIT_STATES:
        bits, block, codes = LOW_BIT_STATES[optimizer]
        if numel >= 4096 and numel % block == 0:
            return 2 * (numel * bits / 8 + numel / block * 4 + codes * 4)
    return 8.0 * numel


def _saved_bytes(cfg: Config, spec: ModelSpec, vocab: int, n_layers: int, bf16: bool) -> float:
    """Bytes autograd saves in one forward of the model with `n_layers` blocks, on fake tensors."""
    # an operator fake tensors cannot run is logged with its traceback before it raises; the caller
    # falls back to the family's formula, so the traceback would only alarm a run's console
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        return _traced_bytes(spec, replace(cfg.model, n_layers=n_layers), vocab, bf16)
    finally:
        fake_log.setLevel(level)


def _traced_bytes(spec: ModelSpec, m: ModelConfig, vocab: int, bf16: bool) -> float:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    saved: dict = {}
    with FakeTensorMode():
        model = spec.build(m, vocab)
        params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
        tokens = torch.zeros(1, m.seq_len, dtype=torch.long)

        def pack(t: torch.Tensor) -> torch.Tensor:
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in params:
                saved[ref] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(tokens)
    return float(sum(saved.values()))


_MEASURED: dict[str, tuple[float, float]] = {}


def _measure(cfg: Config, spec: ModelSpec, vocab: int, bf16: bool) -> tuple[float, float]:
    """(one block's saved bytes, the rest's) per sequence."""
    key = f"{spec.name}|{cfg.model!r}|{vocab}|{bf16}"
    if key not in _MEASURED:
        one, two = _saved_bytes(cfg, spec, vocab, 1, bf16), _saved_bytes(cfg, spec, vocab, 2, bf16)
        _MEASURED[key] = (two - one, one - (two - one))
    return _MEASURED[key]


def _activations(cfg: Config, spec: ModelSpec, vocab: int, bf16: bool, required: bool) -> tuple[float, float, bool]:
    """(block_act, edge_act, known): measured, else the family's formula, else unknown (0, 0)."""
    try:
        block_act, edge_act = _measure(cfg, spec, vocab, bf16)
        return block_act, edge_act, True
    except Exception:  # noqa: BLE001 - e.g. MoE routing has data-dependent shapes: fake tensors cannot run it
        if spec.activation_bytes is None:
            if required:
                raise
            return 0.0, 0.0, False
    value = 2 if bf16 else 4
    block_act = spec.activation_bytes(cfg.model, 1, value).stored
    return block_act, float(cfg.model.seq_len * cfg.model.d_model * value), True


def model_facts(
    cfg: Config, vocab_size: int, precision: str, spec: ModelSpec | None = None, require_activations: bool = True
) -> ModelFacts:
    """`spec`: the family's (default: `model.family`'s). `require_activations=False`: a family
    whose activations neither fake tensors nor a formula give gets `activations_known=False`
    instead of an error (the start-up printout says "unknown")."""
    from kiln.model.registry import get_spec

    spec = spec or get_spec(cfg.model.family)
    vocab = padded_vocab(vocab_size)
    with torch.device("meta"):
        model = spec.build(cfg.model, vocab)
    m = cfg.model
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    # the mean block: with dense first layers (moe_first_dense) layer 0 is not a typical block
    block = sum(p.numel() for n, p in named if n.startswith("layers.")) // m.n_layers
    embed = sum(p.numel() for n, p in named if n.startswith(("tok_emb", "pos_emb")))
    optimizer = sum(optimizer_state_bytes(cfg.optim.name, p.numel()) for _, p in named)
    bf16 = precision == "bf16"
    block_act, edge_act, known = _activations(cfg, spec, vocab, bf16, require_activations)
    # FLOPs are affine in the depth (edges + L x block): two depths give the edges' share
    one, two = (spec.flops(replace(m, n_layers=n), vocab) for n in (1, 2))
    edge_share = min(1.0, max(0.0, (2 * one - two) / spec.flops(m, vocab)))
    return ModelFacts(
        n_layers=m.n_layers,
        block_params=block,
        edge_params=total - block * m.n_layers,
        embed_params=embed,
        block_act=block_act,
        block_input=float(m.seq_len * m.d_model * 4),
        edge_act=max(0.0, edge_act),
        logits=float(m.seq_len * vocab * 4),
        flops_per_seq=spec.flops(m, vocab) * m.seq_len,
        edge_flops_share=edge_share,
        value_bytes=2 if bf16 else 4,
        chunked_loss=cfg.kernels.chunk_size if cfg.kernels.cross_entropy == "chunked" else 0,
        seq_len=m.seq_len,
        d_model=m.d_model,
        optimizer_bytes=optimizer / total,
        activations_known=known,
    )


PHASES = {
    "loss": "the loss's backward",
    "head": "the head's forward",
    "step": "the optimizer step",
    "in flight": "a pipeline's warm-up",
}


@dataclass(frozen=True)
class MemoryBreakdown:
    """The busiest rank's bytes at its peak, by kind, and the phase of the step where it falls."""

    params: float
    grads: float
    optimizer: float
    gathered: float  # FSDP's unsharded parameters and all-gather buffers in flight
    activations: float
    loss: float  # logits, log-probabilities and their gradients
    phase: str
    activations_known: bool = True  # False: activations (and the loss's share) are left out

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations + self.loss

    def describe(self) -> str:
        """The start-up line: each kind in GiB at the peak, and where in the step it falls."""
        parts = [f"parameters {self.params / GiB:.2f} GiB", f"gradients {self.grads / GiB:.2f}"]
        parts.append(f"optimizer {self.optimizer / GiB:.2f}")
        if self.gathered:
            parts.append(f"gathered parameters {self.gathered / GiB:.2f}")
        known = self.activations_known
        parts.append(f"activations ~{self.activations / GiB:.2f}" if known else "activations unknown for this family")
        if self.loss:
            parts.append(f"loss ~{self.loss / GiB:.2f}")
        where = PHASES.get(self.phase, self.phase)
        return f"expected memory per rank at its peak ({where}): {', '.join(parts)}; total ~{self.total / GiB:.2f} GiB"


def in_flight(layout: Layout, rank: int = 0) -> float:
    """Micro-batches (in units of the rank's whole share of layers) whose activations pipeline
    rank `rank` holds at its peak."""
    if layout.pp == 1:
        return 1
    if layout.schedule == "gpipe":
        return layout.accum
    if layout.schedule == "interleaved-1f1b":  # warm-up chunks of 1 / v of the rank's layers each
        v, pp = layout.stages_per_rank, layout.pp
        return (min((v - 1) * pp + 2 * (pp - 1 - rank), layout.accum * v - 1) + 1) / v
    return min(layout.accum, layout.pp - rank)  # 1F1B: warm-up micro-batches before the first backward


def peak_memory(
    f: ModelFacts, layout: Layout, optimizer_bytes: float | None = None, rank: int | None = None
) -> MemoryBreakdown:
    """The peak of the busiest rank over the phases of a step where memory is highest:
    - "loss": the loss's backward begins: every saved activation, the log-probabilities and two
      logit-sized gradients (3 x the float32 logits), the last block still gathered;
    - "head": the head's forward under FSDP: the root's parameters gathered, with their all-gather
      buffer, and the logits being written;
    - "step": the optimizer step: parameters, gradients and moments;
    - on a pipeline's earlier ranks, "in flight": their warm-up micro-batches' activations.
    Gradients exist before the step only when micro-batches accumulate into them. `rank`: one
    pipeline rank's peak instead of the busiest's; `optimizer_bytes`: state bytes per parameter
    (default: the model's optimizer's, `f.optimizer_bytes`)."""
    state_bytes = f.optimizer_bytes if optimizer_bytes is None else optimizer_bytes
    pp, tp, shard_n = layout.pp, layout.tp, layout.dp_shard
    stages = layout.layers_per_stage(f.n_layers)
    ranks = [sum(stages[r::pp]) for r in range(pp)]  # an interleaved rank holds every pp-th stage
    fsdp = shard_n > 1
    mb = layout.micro_batch
    stored = f.block_act / tp
    if tp > 1:  # the sequence-parallel block gathers its input for attention and for the MLP
        stored += 2 * f.block_input * (1 - 1 / tp)
    saved = {"none": stored, "full": f.block_input / tp}
    saved["selective"] = (stored + saved["full"]) / 2  # every other block checkpointed
    per_block = saved[layout.ac] * mb
    logits = mb * f.logits  # the head's output is replicated over tp
    if f.chunked_loss:  # one chunk's float32 logits at a time
        logits = min(f.chunked_loss, mb * f.seq_len) * f.logits / f.seq_len
    block_gathered = f.block_params / tp * 4 if fsdp else 0.0

    def static(params: float) -> tuple[float, float, float]:
        local = params / tp / shard_n
        grads = 4 * local if layout.accum > 1 else 0.0
        if layout.accum > 1 and layout.grad_sync == "last_microbatch" and pp == 1:
            grads = 4 * params / tp  # not reduce-scattered until the step's last micro-batch: whole
        return 4 * local, grads, state_bytes * local

    candidates = []
    if pp == 1:
        p, g, o = static(f.n_layers * f.block_params + f.edge_params)
        acts = f.n_layers * per_block + f.edge_act * mb / tp
        candidates.append(MemoryBreakdown(p, g, o, block_gathered, acts, 3 * logits, "loss"))
        if fsdp:
            root = (f.edge_params / tp) * 4
            candidates.append(MemoryBreakdown(p, g, o, block_gathered + 2 * root, acts, logits, "head"))
        candidates.append(MemoryBreakdown(p, p, o, 0.0, 0.0, 0.0, "step"))
    else:
        for r, blocks in enumerate(ranks[:-1]):  # earlier ranks hold more micro-batches in flight under 1F1B
            if rank is not None and r != rank:
                continue
            p, g, o = static(blocks * f.block_params + (f.embed_params if r == 0 else 0.0))
            acts = (blocks * per_block + (f.edge_act * mb / tp if r == 0 else 0.0)) * in_flight(layout, r)
            candidates.append(MemoryBreakdown(p, g, o, 2 * block_gathered, acts, 0.0, "in flight"))
            candidates.append(MemoryBreakdown(p, p, o, 0.0, 0.0, 0.0, "step"))
        if rank is not None and rank != pp - 1:
            return max(candidates, key=lambda c: c.total)
        p, g, o = static(ranks[-1] * f.block_params + f.edge_params - f.embed_params)
        held = in_flight(layout, pp - 1)
        # GPipe's last rank keeps every micro-batch's loss graph (its logits) until the backwards
        loss = (held + 2) * logits if layout.schedule == "gpipe" else 3 * logits
        candidates.append(MemoryBreakdown(p, g, o, block_gathered, ranks[-1] * per_block * held, loss, "loss"))
        candidates.append(MemoryBreakdown(p, p, o, 0.0, 0.0, 0.0, "step"))
    return max(candidates, key=lambda c: c.total)


def run_layout(cfg: Config, dims: ParallelDims, grad_sync: str = "every_microbatch") -> Layout:
    """The layout `kiln train` runs `cfg` in at `dims`, as the planner writes it (the busiest
    rank's micro-batches under uneven `parallel.dp_batch_shares`)."""
    p = cfg.parallel
    local = max(p.dp_batch_shares) if p.dp_batch_shares else cfg.global_batch // dims.dp_size
    if dims.pp > 1:  # the schedule splits the rank's batch into pp_microbatches
        accum = p.pp_microbatches
        micro = max(1, local // accum)
    else:
        accum = -(-local // (cfg.train.micro_batch_size or local))
        micro = -(-local // accum)
    return Layout(
        dims.dp_replicate,
        dims.dp_shard,
        dims.tp,
        dims.pp,
        micro,
        accum,
        p.activation_checkpoint,
        p.pp_schedule,
        p.stages_per_rank,
        tuple(p.pp_layers),
        grad_sync,
    )


def estimate_memory(
    cfg: Config,
    spec: ModelSpec,
    vocab_size: int,
    dims: ParallelDims,
    precision: str,
    grad_sync: str = "every_microbatch",
) -> MemoryBreakdown:
    """The start-up printout's estimate: this model's peak for the run's own layout, the number
    `kiln plan` gives that layout. No machine profile is involved (that times steps; memory needs
    none), so it is available before the first step."""
    facts = model_facts(cfg, vocab_size, precision, spec, require_activations=False)
    peak = peak_memory(facts, run_layout(cfg, dims, grad_sync))
    return replace(peak, activations_known=facts.activations_known)


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
    until then; chosen when this model's peak with whole gradients still fits in 80% of the
    device's memory."""
    if cfg.parallel.grad_sync != "auto":
        return cfg.parallel.grad_sync
    if dims.dp_shard == 1 or dims.pp > 1:  # nothing sharded; a pipeline schedule reduces once anyway
        return "every_microbatch"
    peak = estimate_memory(cfg, spec, vocab_size, dims, precision, "last_microbatch")
    if not peak.activations_known:  # the family gives no activation estimate: do not gamble
        return "every_microbatch"
    fits = peak.total <= 0.8 * device_memory_bytes(device)
    return "last_microbatch" if fits else "every_microbatch"
