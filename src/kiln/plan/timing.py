"""Step time of a layout on a device kind: the planner's time model.

    step = compute (x recomputation) x (1 + pipeline bubble) + exposed communication

- Compute: the rank's share of the step's training FLOPs (the family's count, as MFU uses) at
  the device's peak times an efficiency that falls for narrow work (small micro-batches, matrices
  split by tp): eff = peak_eff * w / (w + w_half), w = tokens per micro-batch x d_model / tp.
  Activation checkpointing adds a forward of the checkpointed blocks (a third of their FLOPs).
- FSDP2 (as Kiln runs it: gathers in the compute precision, bf16 or fp32, reductions in fp32):
  per micro-batch two all-gathers of the stage's parameters and one reduce-scatter of its
  gradients (`parallel.grad_sync = "last_microbatch"` and pipelines: one per step), ring cost
  (n-1)/n x bytes / bandwidth + alpha x (n-1); they overlap the blocks' compute, so only what
  exceeds it, and the first block's gather, is exposed.
- HSDP: an all-reduce of the sharded gradients across replicas, once per step (the last
  micro-batch's), exposed.
- Tensor parallelism (sequence parallel): per block and micro-batch, two all-gathers and two
  reduce-scatters of the activations forward and as many backward, on the critical path.
- Pipelines: the busiest rank's compute (its blocks, and the head on the last), the bubble
  (pp - 1) / (micro-batches x virtual stages), and point-to-point sends.
Bandwidth is the node's links while a group stays within a node, the network's once it spans
nodes. The constants are datasheet values until `kiln plan profile` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.plan.cluster import DeviceKind
from kiln.plan.layout import Layout
from kiln.plan.peak_memory import ModelFacts

PEAK_EFFICIENCY = 0.55  # of the datasheet peak, reached by wide matrix products
HALF_WIDTH = 2**21  # tokens x width per rank at which half of it is reached


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    fsdp: float  # exposed
    tp: float
    dp: float
    pp: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.fsdp + self.tp + self.dp + self.pp

    def dominant(self) -> str:
        parts = {
            "compute": self.compute,
            "pipeline bubble": self.bubble,
            "FSDP communication": self.fsdp,
            "tensor-parallel communication": self.tp,
            "data-parallel all-reduce": self.dp,
            "pipeline sends": self.pp,
        }
        return max(parts, key=parts.__getitem__)


def rank_blocks(f: ModelFacts, layout: Layout) -> list[int]:
    """Blocks held by each pipeline rank (an interleaved rank holds every pp-th stage)."""
    counts = layout.layers_per_stage(f.n_layers)
    return [sum(counts[r :: layout.pp]) for r in range(layout.pp)]


def busiest_stage_share(f: ModelFacts, layout: Layout) -> float:
    """The share of a step's FLOPs on the busiest pipeline rank: its blocks plus, on the last
    rank, the head (with a large vocabulary the head outweighs several blocks, and every
    micro-batch waits for that rank)."""
    if layout.pp == 1:
        return 1.0
    per_block = (1 - f.edge_flops_share) / f.n_layers
    blocks = rank_blocks(f, layout)
    return max(n * per_block + (f.edge_flops_share if r == layout.pp - 1 else 0.0) for r, n in enumerate(blocks))


def gradient_syncs(layout: Layout) -> int:
    """Reduce-scatters of the gradients per step: Kiln's own accumulation loop reduces every
    micro-batch unless `grad_sync = "last_microbatch"`; a pipeline schedule turns syncs off until
    the step's last micro-batch, then reduces once."""
    return 1 if layout.pp > 1 or layout.grad_sync == "last_microbatch" else layout.accum


def _ring(bytes_: float, n: int, gbps: float, latency_us: float, reduce: bool = False) -> float:
    """Seconds of an all-gather / reduce-scatter (an all-reduce is both: `reduce`) among n ranks."""
    if n <= 1:
        return 0.0
    factor = 2 if reduce else 1
    return factor * ((n - 1) / n * bytes_ / (gbps * 1e9) + (n - 1) * latency_us * 1e-6)


def step_time(f: ModelFacts, layout: Layout, global_batch: int, kind: DeviceKind, per_node: int) -> StepTime:
    seqs_per_rank = global_batch / layout.dp
    n_micro = layout.accum
    mb = layout.micro_batch
    recompute = {"none": 0.0, "selective": 1 / 6, "full": 1 / 3}[layout.ac]
    flops = f.flops_per_seq * seqs_per_rank * busiest_stage_share(f, layout) / layout.tp * (1 + recompute)
    width = mb * f.seq_len * f.d_model / layout.tp
    efficiency = PEAK_EFFICIENCY * width / (width + HALF_WIDTH)
    compute = flops / (kind.peak_tflops * 1e12 * efficiency)

    def bandwidth(group: int, inner: int) -> float:
        """A group of `group` ranks whose members are `inner` ranks apart."""
        return kind.intra_gbps if group * inner <= per_node else kind.inter_gbps

    blocks = max(rank_blocks(f, layout))
    stage_params = (blocks * f.block_params + f.edge_params / layout.pp) / layout.tp
    stage_bytes = stage_params * 4  # gradients are reduced in fp32
    syncs = gradient_syncs(layout)
    fsdp = 0.0
    if layout.dp_shard > 1:
        bw = bandwidth(layout.dp_shard, layout.tp)
        ring = _ring(stage_bytes, layout.dp_shard, bw, kind.latency_us)
        gather = _ring(stage_params * f.value_bytes, layout.dp_shard, bw, kind.latency_us)
        # two all-gathers per micro-batch (forward, backward); the reduce-scatters overlap the
        # backward of the micro-batches they follow, except a pipeline's single one after the last, exposed
        overlapped = layout.pp == 1
        per_micro = 2 * gather + (syncs / n_micro) * ring * overlapped
        per_micro_compute = compute / n_micro
        first_gather = _ring(stage_params * f.value_bytes / max(1, blocks), layout.dp_shard, bw, kind.latency_us)
        fsdp = n_micro * (max(0.0, per_micro - per_micro_compute) + first_gather) + (
            0.0 if overlapped else syncs * ring
        )
    dp = 0.0
    if layout.dp_replicate > 1:
        dp = _ring(
            stage_bytes / layout.dp_shard,
            layout.dp_replicate,
            bandwidth(layout.dp_replicate, layout.dp_shard * layout.tp),
            kind.latency_us,
            reduce=True,
        )
    tp = 0.0
    if layout.tp > 1:
        act = mb * f.seq_len * f.d_model * f.value_bytes
        tp = n_micro * blocks * 8 * _ring(act, layout.tp, bandwidth(layout.tp, 1), kind.latency_us)
    bubble = pp_time = 0.0
    if layout.pp > 1:
        virtual = layout.stages_per_rank if layout.schedule == "interleaved-1f1b" else 1
        bubble = (compute + tp) * (layout.pp - 1) / (n_micro * virtual)
        send = mb * f.seq_len * f.d_model * f.value_bytes
        hop = kind.intra_gbps if layout.dp * layout.tp * layout.pp <= per_node else kind.inter_gbps
        pp_time = 2 * n_micro * virtual * (send / (hop * 1e9) + kind.latency_us * 1e-6)
    return StepTime(compute=compute, bubble=bubble, fsdp=fsdp, tp=tp, dp=dp, pp=pp_time)


def local_step_time(f: ModelFacts, layout: Layout, global_batch: int, compute_fit, link, cores: int) -> StepTime:
    """Step time of `layout` as processes of this machine (gloo), from `kiln plan profile`'s
    measurements: compute = per-operation overhead + per-sequence work at the measured micro-batch
    size (split by tp, not the overhead); collectives do not overlap compute (the same cores run
    both); processes sharing cores slow each other in proportion to the time they are busy (a
    pipeline rank waiting in the bubble leaves its core to the others; one waiting for a heavier
    stage, by this machine's measurements, does not)."""
    world = layout.world
    threads = max(1, cores // world)
    blocks = max(rank_blocks(f, layout))
    stage = busiest_stage_share(f, layout)
    recompute = {"none": 0.0, "selective": 1 / 6, "full": 1 / 3}[layout.ac]
    mb, n_micro = layout.micro_batch, layout.accum
    whole = compute_fit.forward_backward_s(mb)  # tp splits the per-sequence work, not the per-op overhead
    per_micro = stage * (compute_fit.fixed_s + max(0.0, whole - compute_fit.fixed_s) / layout.tp) * (1 + recompute)
    params_local = (blocks * f.block_params + f.edge_params / layout.pp) / layout.tp / layout.dp_shard
    compute = n_micro * per_micro + compute_fit.optimizer_s_per_param * params_local

    def collective(bytes_: float, n: int, reduce: bool = False) -> float:
        return _ring(bytes_, n, link.gbps, link.alpha_s * 1e6, reduce)

    stage_params = (blocks * f.block_params + f.edge_params / layout.pp) / layout.tp
    stage_bytes = stage_params * 4  # gradients are reduced in fp32
    syncs = gradient_syncs(layout)
    fsdp = 0.0
    if layout.dp > 1:  # replicas too are FSDP2 units (HSDP), with its hooks
        ring = collective(stage_bytes, layout.dp_shard)
        gather = collective(stage_params * f.value_bytes, layout.dp_shard)
        fsdp = n_micro * (2 * gather + link.fsdp_unit_s * (blocks + 1)) + syncs * ring  # gathers, reductions
    dp = collective(stage_bytes / layout.dp_shard, layout.dp_replicate, reduce=True)  # once a step
    act = mb * f.seq_len * f.d_model * f.value_bytes
    tp = 0.0
    if layout.tp > 1:
        overhead = link.tp_block_s + link.tp_block_per_seq_s * mb
        tp = n_micro * blocks * (8 * collective(act, layout.tp) + overhead)
    bubble = pp_time = 0.0
    if layout.pp > 1:
        virtual = layout.stages_per_rank if layout.schedule == "interleaved-1f1b" else 1
        bubble = (n_micro * per_micro + tp) * (layout.pp - 1) / (n_micro * virtual)
        pp_time = 2 * n_micro * virtual * (link.alpha_s + act / (link.gbps * 1e9))  # point to point
    busy = compute + fsdp + tp + dp + pp_time
    # Measuring how much processes slow each other gave 0.9-1.3 for two one-thread processes on
    # this 2-core machine and 1.8-2.5 for four, run to run: noisier than the effect, so the cores'
    # count decides.
    sharing = world * threads / cores
    slowdown = max(1.0, sharing * busy / (busy + bubble))
    return StepTime(
        compute=compute * slowdown,
        bubble=bubble * slowdown,
        fsdp=fsdp * slowdown,
        tp=tp * slowdown,
        dp=dp * slowdown,
        pp=pp_time * slowdown,
    )
