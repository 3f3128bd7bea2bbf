"""`kiln plan`: enumerate the layouts a cluster allows, keep those that fit, rank by predicted
tokens/s, and say why the best wins and why each rejected family lost.

The space: every factorisation of the world size into dp_replicate x dp_shard x tp x pp (tp
dividing the heads, pp at most the layers), every micro-batch that divides a rank's share of the
global batch, three activation-checkpointing modes, and on pipelines the three schedules (and two
or four virtual stages per rank for the interleaved one) and, for 1F1B and GPipe, layer splits
that lighten the first and last stages (see `stage_splits`). Memory (kiln.plan.peak_memory) prunes;
time (kiln.plan.timing) ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.plan.cluster import Cluster
from kiln.plan.layout import Layout
from kiln.plan.peak_memory import MemoryBreakdown, ModelFacts, model_facts, peak_memory
from kiln.plan.timing import StepTime, local_step_time, step_time

GiB = 2**30
AC_MODES = ("none", "selective", "full")
HEADROOM = 0.92  # of a device's memory a plan may use: allocator fragmentation, CUDA context, buffers


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    tokens_per_s: float
    fits: bool


@dataclass
class SearchResult:
    plans: list[Candidate]  # fitting, fastest first
    examined: int
    seconds: float
    rejected: dict[str, str] = field(default_factory=dict)  # family -> why
    families: dict[str, Candidate] = field(default_factory=dict)  # family -> its best fitting plan


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def stage_splits(n_layers: int, pp: int) -> list[tuple[int, ...]]:
    """Layer counts per pipeline stage worth trying: the even split (written `()`) where the layers
    divide, then lighter first and last stages (as Megatron-LM's first / last pipeline-stage layer
    counts): the last also runs the head and the loss, the first holds the most micro-batches in
    flight under 1F1B; with two stages only the last is lightened). The stages between share the
    rest as evenly as they can, never lighter than the edges."""
    if pp == 1:
        return [()]
    top = -(-n_layers // pp)
    out: list[tuple[int, ...]] = []
    if pp == 2:
        pairs = [(n_layers - last, last) for last in range(top, 0, -1)]
    else:
        pairs = [(first, last) for first in range(top, 0, -1) for last in range(top, 0, -1)]
    for first, last in pairs:
        if pp == 2:
            counts: tuple[int, ...] = (first, last)
            ok = last <= first
        else:
            base, extra = divmod(n_layers - first - last, pp - 2)
            counts = (first, *[base + 1] * extra, *[base] * (pp - 2 - extra), last)
            ok = base >= max(first, last)
        if ok and min(counts) >= 1:
            out.append(() if len(set(counts)) == 1 else counts)
    return out


def layouts(world: int, global_batch: int, n_layers: int, n_heads: int, n_kv_heads: int):
    """Every layout of the space (see the module docstring)."""
    for tp in divisors(world):
        if n_heads % tp or n_kv_heads % tp:
            continue
        for pp in divisors(world // tp):
            if pp > n_layers:
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            splits = stage_splits(n_layers, pp)
            per_rank = global_batch // dp
            for replicate in divisors(dp):
                shard = dp // replicate
                for micro in divisors(per_rank):
                    accum = per_rank // micro
                    for ac in AC_MODES:
                        if pp == 1:
                            yield Layout(replicate, shard, tp, 1, micro, accum, ac)
                            if shard > 1 and accum > 1:  # or reduce-scatter once a step, gradients whole till then
                                yield Layout(replicate, shard, tp, 1, micro, accum, ac, grad_sync="last_microbatch")
                            continue
                        if accum < pp:
                            continue  # fewer micro-batches than stages: the pipeline never fills
                        for split in splits:
                            yield Layout(replicate, shard, tp, pp, micro, accum, ac, "1f1b", stage_layers=split)
                            yield Layout(replicate, shard, tp, pp, micro, accum, ac, "gpipe", stage_layers=split)
                        for v in (2, 4):
                            if n_layers % (pp * v) == 0:
                                yield Layout(replicate, shard, tp, pp, micro, accum, ac, "interleaved-1f1b", v)


def family(layout: Layout) -> str:
    data = {(True, True): "HSDP", (True, False): "FSDP", (False, True): "replicated (DDP)"}.get(
        (layout.dp_shard > 1, layout.dp_replicate > 1), ""
    )
    parts = [data, "TP" if layout.tp > 1 else "", "PP" if layout.pp > 1 else ""]
    return " + ".join(p for p in parts if p) or "single device"


def search(
    cfg: Config, vocab_size: int, cluster: Cluster, precision: str = "bf16", facts: ModelFacts | None = None
) -> SearchResult:
    if cluster.mixed:
        raise ConfigError(
            f"cluster {cluster.describe()} mixes device kinds; plans for mixed clusters (uneven "
            "layer and batch splits) are not built yet: plan one group at a time"
        )
    group = cluster.groups[0]
    kind, per_node = group.kind, group.per_node
    t0 = time.perf_counter()
    f = facts or model_facts(cfg, vocab_size, precision)
    timer = lambda layout: step_time(f, layout, cfg.global_batch, kind, per_node)  # noqa: E731
    if cluster.local:
        import os

        from kiln.plan.profile import load_profile

        cores = os.cpu_count() or 1
        threads = max(1, cores // cluster.world_size)
        measured = load_profile(cfg, threads)
        if measured is None:
            raise ConfigError(
                f"--cluster {cluster.name} needs this machine's measurements: run kiln plan profile "
                f"with the same --preset/--set and --cluster first"
            )
        timer = lambda layout: local_step_time(f, layout, cfg.global_batch, *measured, cores)  # noqa: E731
    m = cfg.model
    budget = kind.memory_gb * 1e9 * HEADROOM
    fitting: list[Candidate] = []
    smallest: dict[str, Candidate] = {}
    examined = 0
    for layout in layouts(cluster.world_size, cfg.global_batch, m.n_layers, m.n_heads, m.kv_heads):
        examined += 1
        memory = peak_memory(f, layout)
        fits = memory.total <= budget
        name = family(layout)
        if not fits:
            best = smallest.get(name)
            if best is None or memory.total < best.memory.total:
                smallest[name] = Candidate(layout, memory, None, 0.0, False)  # type: ignore[arg-type]
            continue
        t = timer(layout)
        fitting.append(Candidate(layout, memory, t, cfg.global_batch * m.seq_len / t.total, True))
    fitting.sort(key=lambda c: -c.tokens_per_s)
    families: dict[str, Candidate] = {}
    for c in fitting:
        families.setdefault(family(c.layout), c)
    rejected = {}
    for name, c in smallest.items():
        if name not in families:
            rejected[name] = (
                f"does not fit: its smallest layout ({c.layout.describe()}) needs "
                f"{c.memory.total / GiB:.1f} GiB per device, above {budget / GiB:.1f} GiB usable"
            )
    return SearchResult(fitting, examined, time.perf_counter() - t0, rejected, families)


def explain(result: SearchResult, top: int = 3) -> list[str]:
    """Why the best plan beats the next ones, and why each other family lost."""
    if not result.plans:
        return ["no layout fits: " + "; ".join(f"{k}: {v}" for k, v in result.rejected.items())]
    best = result.plans[0]
    lines = [
        f"best: {best.layout.describe()} — {best.tokens_per_s:,.0f} tokens/s, {best.memory.total / GiB:.1f} "
        f"GiB; its step is {_parts(best.time)}"
    ]
    for c in result.plans[1:top]:
        lines.append(
            f"  vs {c.layout.describe()}: {c.tokens_per_s / best.tokens_per_s - 1:+.1%} — "
            f"{_difference(best.time, c.time)}"
        )
    for name, c in result.families.items():
        if c is not best and family(c.layout) != family(best.layout):
            lines.append(
                f"{name}: best {c.tokens_per_s / best.tokens_per_s - 1:+.1%} ({c.layout.describe()}); "
                f"held back by {_difference(best.time, c.time)} ({_parts(c.time)})"
            )
    lines += [f"{name}: {why}" for name, why in result.rejected.items()]
    return lines


def _parts(t: StepTime) -> str:
    named = [
        ("compute", t.compute),
        ("bubble", t.bubble),
        ("FSDP", t.fsdp),
        ("TP", t.tp),
        ("DP", t.dp),
        ("PP sends", t.pp),
    ]
    return ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in named if v > 0)


def _difference(a: StepTime, b: StepTime) -> str:
    deltas = {
        "compute": b.compute - a.compute,
        "bubble": b.bubble - a.bubble,
        "FSDP": b.fsdp - a.fsdp,
        "TP": b.tp - a.tp,
        "DP": b.dp - a.dp,
        "PP sends": b.pp - a.pp,
    }
    name = max(deltas, key=lambda k: abs(deltas[k]))
    return f"{name} {deltas[name] * 1e3:+.1f} ms per step"
