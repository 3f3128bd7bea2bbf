"""Peak memory per rank of a layout: the planner's memory model.

Static state, per rank: float32 parameters, gradients and AdamW's two moments of the rank's stage
(the blocks of its pipeline stage, plus the embedding on the first stage and the head on the
last), divided by the FSDP shard count and by tp.
Transient state under FSDP2: the gathered parameters of the block being computed and of the one
prefetched, and in backward their unsharded gradients before the reduce-scatter.
Activations are *measured*, not taken from a formula: one forward of the model with 1 and 2 blocks
under FakeTensorMode (no memory, no device) counts the bytes autograd saves, which gives a block's
and the rest's saved bytes per sequence for this exact model code and precision. They scale with
the micro-batch, divide by tp (sequence parallelism; the gathered block inputs do not), shrink to
the block inputs under activation checkpointing (plus one block being recomputed), and are
multiplied by the micro-batches a pipeline schedule keeps in flight on its first stage. The loss
adds its float32 logits and their gradient (one chunk's with the chunked loss head).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kiln.config import Config
from kiln.model.spec import padded_vocab
from kiln.plan.layout import Layout


@dataclass(frozen=True)
class ModelFacts:
    """What the memory and time models need of a model, measured once per config."""

    n_layers: int
    block_params: int  # parameters of one block
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


def _saved_bytes(cfg: Config, vocab: int, n_layers: int, bf16: bool) -> float:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    from kiln.model.registry import build_model

    m = replace(cfg.model, n_layers=n_layers, dropout=cfg.model.dropout)
    saved: dict = {}
    with FakeTensorMode():
        model = build_model(m, vocab)
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


def _measure(cfg: Config, vocab: int, bf16: bool) -> tuple[float, float]:
    """(one block's saved bytes, the rest's) per sequence."""
    key = f"{cfg.model!r}|{vocab}|{bf16}"
    if key not in _MEASURED:
        one, two = _saved_bytes(cfg, vocab, 1, bf16), _saved_bytes(cfg, vocab, 2, bf16)
        _MEASURED[key] = (two - one, one - (two - one))
    return _MEASURED[key]


def model_facts(cfg: Config, vocab_size: int, precision: str) -> ModelFacts:
    from kiln.model.registry import build_model, get_spec

    spec = get_spec(cfg.model.family)
    vocab = padded_vocab(vocab_size)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab)
    block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.0."))
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("tok_emb", "pos_emb")))
    bf16 = precision == "bf16"
    value = 2 if bf16 else 4
    try:
        block_act, edge_act = _measure(cfg, vocab, bf16)
    except Exception:  # noqa: BLE001 - e.g. MoE routing has data-dependent shapes: fake tensors cannot run it
        if spec.activation_bytes is None:
            raise
        block_act = spec.activation_bytes(cfg.model, 1, value).stored
        edge_act = float(cfg.model.seq_len * cfg.model.d_model * value)
    m = cfg.model
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
        value_bytes=value,
        chunked_loss=cfg.kernels.chunk_size if cfg.kernels.cross_entropy == "chunked" else 0,
        seq_len=m.seq_len,
        d_model=m.d_model,
    )


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

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations + self.loss


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
    f: ModelFacts, layout: Layout, optimizer_bytes: float = 8.0, rank: int | None = None
) -> MemoryBreakdown:
    """The peak of the busiest rank over the phases of a step where memory is highest:
    - "loss": the loss's backward begins: every saved activation, the log-probabilities and two
      logit-sized gradients (3 x the float32 logits), the last block still gathered;
    - "head": the head's forward under FSDP: the root's parameters gathered, with their all-gather
      buffer, and the logits being written;
    - "step": the optimizer step: parameters, gradients and moments;
    - on a pipeline's earlier ranks, "in flight": their warm-up micro-batches' activations.
    Gradients exist before the step only when micro-batches accumulate into them. `rank`: one
    pipeline rank's peak instead of the busiest's."""
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
        return 4 * local, grads, optimizer_bytes * local

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
