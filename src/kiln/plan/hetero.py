"""Plans for mixed clusters: work split by speed instead of evenly.

Two shapes, each against its uniform twin (the same layout, the work split evenly, so the
slowest device paces every step):

- data parallel across groups (FSDP2 over every device): each data-parallel rank takes a share
  of the global batch in proportion to its device's speed (`parallel.dp_batch_shares`; every rank
  runs the same number of micro-batches, of its own size);
- pipeline across groups (one stage per group, FSDP2 within it): each stage takes a number of
  layers in proportion to its group's speed (`parallel.pp_layers`).

A group's speed is the time the model says one sequence (or one layer) takes on its device; the
step is the slowest rank's. Communication spanning groups uses the slowest group's network.
Ranks are numbered group by group, in the cluster file's order (launch the groups in that order).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kiln.plan.cluster import Cluster, DeviceKind, Group
from kiln.plan.layout import Layout
from kiln.plan.peak_memory import MemoryBreakdown, ModelFacts, peak_memory
from kiln.plan.timing import StepTime, step_time

AC_MODES = ("none", "selective", "full")


def split_by_speed(
    total: int, speeds: list[float], minimum: int = 1, unit: int = 1, fixed: list[float] | None = None
) -> list[int] | None:
    """Integers summing to `total`, each at least `minimum` and a multiple of `unit`, that
    minimise max((fixed_i + n_i) / speed_i) (`fixed`: work each already has, in the same units):
    units go one at a time to whoever finishes its next one first. None when no such split exists."""
    n = [minimum] * len(speeds)
    base = fixed or [0.0] * len(speeds)
    left = total - minimum * len(speeds)
    if left < 0 or left % unit or minimum % unit:
        return None
    for _ in range(left // unit):
        i = min(range(len(speeds)), key=lambda k: (base[k] + n[k] + unit) / speeds[k])
        n[i] += unit
    return n


def group_shares(total: int, counts: list[int], speeds: list[float], unit: int) -> list[int] | None:
    """Sequences per rank for each group (its `counts[g]` ranks alike), multiples of `unit` and
    at least one unit, adding up to `total` over all ranks, the slowest rank as fast as possible."""
    if len(counts) == 2:  # exact: every split of the first group, the rest to the second
        best = None
        for first in range(unit, total // counts[0] + 1, unit):
            rest = total - first * counts[0]
            if rest < unit * counts[1] or rest % (counts[1] * unit):
                continue
            split = [first, rest // counts[1]]
            cost = max(split[0] / speeds[0], split[1] / speeds[1])
            if best is None or cost < best[0]:
                best = (cost, split)
        return best[1] if best else None
    shares = [unit] * len(counts)
    left = total - unit * sum(counts)
    while left > 0:
        fits = [g for g in range(len(counts)) if counts[g] * unit <= left]
        if not fits:
            return None
        g = min(fits, key=lambda k: (shares[k] + unit) / speeds[k])
        shares[g] += unit
        left -= counts[g] * unit
    return shares if left == 0 else None


@dataclass
class HeteroPlan:
    shape: str  # "data" | "pipeline"
    layout: Layout  # the degrees, micro-batching and AC (micro_batch: the largest rank's)
    split: list[int]  # sequences per data-parallel rank (data) or layers per stage (pipeline)
    uniform_split: list[int]
    tokens_per_s: float
    uniform_tokens_per_s: float  # the same layout with the work split evenly (0: it cannot run so)
    memory: list[MemoryBreakdown]  # the busiest rank of each group
    times: list[StepTime]  # each group's step

    @property
    def speedup(self) -> float:
        return self.tokens_per_s / self.uniform_tokens_per_s if self.uniform_tokens_per_s else float("inf")

    def sets(self) -> list[str]:
        # the layout's micro-batch is the largest share's: every rank runs that many passes
        key = "parallel.dp_batch_shares" if self.shape == "data" else "parallel.pp_layers"
        return [
            *(s for s in self.layout.sets() if not s.startswith(key + "=")),
            f"{key}=[{','.join(map(str, self.split))}]",
        ]

    def describe(self) -> str:
        what = "sequences per rank" if self.shape == "data" else "layers per stage"
        return f"{self.layout.describe()}; {what} {_runs(self.split)} (uniform {_runs(self.uniform_split)})"


def _runs(values: list[int]) -> str:
    """[49, 49, 49, 15] -> "49 x3, 15"."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out.append(f"{values[i]} x{j - i}" if j - i > 1 else str(values[i]))
        i = j
    return "[" + ", ".join(out) + "]"


def _network(cluster: Cluster, kind: DeviceKind) -> DeviceKind:
    """`kind` with the slowest group's network: traffic that spans groups goes at that rate."""
    return replace(
        kind,
        inter_gbps=min(g.kind.inter_gbps for g in cluster.groups),
        latency_us=max(g.kind.latency_us for g in cluster.groups),
    )


def _data_parallel(
    f: ModelFacts, cluster: Cluster, global_batch: int, accum: int, ac: str, split: list[int], budget: float
) -> tuple[float, list[MemoryBreakdown], list[StepTime]] | None:
    """(step seconds, memory, time per group) of FSDP2 over every device with `split` sequences
    per group's ranks (one entry per group), or None when a share does not fit its device."""
    world = cluster.world_size
    memory, times = [], []
    for group, share in zip(cluster.groups, split):
        if share % accum:
            return None
        layout = Layout(1, world, 1, 1, share // accum, accum, ac)
        mem = peak_memory(f, layout)
        if mem.total > group.kind.memory_gb * 1e9 * budget:
            return None
        memory.append(mem)
        times.append(step_time(f, layout, share * world, _network(cluster, group.kind), group.per_node))
    return max(t.total for t in times), memory, times


def _stage_facts(f: ModelFacts, layers: int, pp: int, last: bool = False) -> ModelFacts:
    """The facts of a stage of `layers` blocks (and the head on the `last`), in the shape the
    models expect of one of `pp` equal stages (blocks = n_layers / pp, FLOPs by blocks)."""
    share = layers * (1 - f.edge_flops_share) / f.n_layers + (f.edge_flops_share if last else 0.0)
    return replace(f, n_layers=layers * pp, flops_per_seq=f.flops_per_seq * share * pp, edge_flops_share=0.0)


def _pipeline(
    f: ModelFacts,
    cluster: Cluster,
    global_batch: int,
    micro: int,
    accum: int,
    ac: str,
    layers: list[int],
    budget: float,
) -> tuple[float, list[MemoryBreakdown], list[StepTime]] | None:
    pp = len(cluster.groups)
    dp = cluster.groups[0].devices
    memory, times = [], []
    for i, (group, n) in enumerate(zip(cluster.groups, layers)):
        sf = _stage_facts(f, n, pp, last=i == pp - 1)
        layout = Layout(1, dp, 1, pp, micro, accum, ac, "1f1b")
        mem = peak_memory(sf, layout, rank=i)  # this group's own stage: its layers, its micro-batches in flight
        if mem.total > group.kind.memory_gb * 1e9 * budget:
            return None
        memory.append(mem)
        times.append(step_time(sf, layout, global_batch, _network(cluster, group.kind), group.per_node))
    return max(t.total for t in times), memory, times


def _speeds_per_sequence(f: ModelFacts, cluster: Cluster, layout_of) -> list[float]:
    return [1.0 / step_time(f, layout_of(g), 1, g.kind, g.per_node).compute for g in cluster.groups]


def hetero_plans(f: ModelFacts, cluster: Cluster, global_batch: int, budget: float) -> list[HeteroPlan]:
    """Every data-parallel and pipeline plan of a mixed cluster that fits, fastest first."""
    plans = _data_parallel_plans(f, cluster, global_batch, budget) + _pipeline_plans(f, cluster, global_batch, budget)
    plans.sort(key=lambda p: -p.tokens_per_s)
    return plans


def _data_parallel_plans(f: ModelFacts, cluster: Cluster, global_batch: int, budget: float) -> list[HeteroPlan]:
    """The data-parallel plans that fit, in the order of their accumulation and checkpointing."""
    world, tokens = cluster.world_size, global_batch * f.seq_len
    plans: list[HeteroPlan] = []
    groups: list[Group] = list(cluster.groups)
    # data parallel: shares per rank by speed; the ranks of a group share alike
    counts = [g.devices for g in groups]
    speeds_by_ac = {
        ac: _speeds_per_sequence(f, cluster, lambda g, ac=ac: Layout(1, world, 1, 1, 1, 1, ac)) for ac in AC_MODES
    }
    for accum in (a for a in range(1, global_batch + 1) if global_batch % a == 0):
        for ac in AC_MODES:
            shares = group_shares(global_batch, counts, speeds_by_ac[ac], accum)
            if shares is None:
                continue
            got = _data_parallel(f, cluster, global_batch, accum, ac, shares, budget)
            if got is None:
                continue
            even = global_batch // world
            uniform = (
                _data_parallel(f, cluster, global_batch, accum, ac, [even] * len(groups), budget)
                if global_batch % world == 0 and even % accum == 0
                else None
            )
            layout = Layout(1, world, 1, 1, max(shares) // accum, accum, ac)
            per_rank = [s for s, n in zip(shares, counts) for _ in range(n)]
            plans.append(
                HeteroPlan(
                    "data",
                    layout,
                    per_rank,
                    [even] * world,
                    tokens / got[0],
                    tokens / uniform[0] if uniform else 0.0,
                    got[1],
                    got[2],
                )
            )
    return plans


def _pipeline_plans(f: ModelFacts, cluster: Cluster, global_batch: int, budget: float) -> list[HeteroPlan]:
    """The pipeline plans that fit (none unless the groups are of equal size), in the order of
    their micro-batch size and checkpointing."""
    tokens = global_batch * f.seq_len
    plans: list[HeteroPlan] = []
    groups: list[Group] = list(cluster.groups)
    # pipeline: one stage per group (groups of equal size), layers by speed
    if len(groups) > 1 and len({g.devices for g in groups}) == 1 and f.n_layers >= len(groups):
        pp, dp = len(groups), groups[0].devices
        head = f.edge_flops_share * f.n_layers / max(1e-9, 1 - f.edge_flops_share)  # the last stage's head, in blocks
        even_layers = split_by_speed(f.n_layers, [1.0] * pp)
        assert even_layers is not None  # n_layers >= pp: a layer each at least
        if global_batch % dp == 0:
            seqs = global_batch // dp  # per data-parallel rank
            for micro in (m for m in range(1, seqs + 1) if seqs % m == 0):
                accum = seqs // micro
                if accum < pp:
                    continue
                for ac in AC_MODES:
                    speeds = [
                        1.0
                        / step_time(
                            _stage_facts(f, 1, pp),
                            Layout(1, dp, 1, pp, micro, accum, ac),
                            global_batch,
                            g.kind,
                            g.per_node,
                        ).compute
                        for g in groups
                    ]
                    layers = split_by_speed(f.n_layers, speeds, fixed=[0.0] * (pp - 1) + [head])
                    assert layers is not None  # as even_layers
                    got = _pipeline(f, cluster, global_batch, micro, accum, ac, layers, budget)
                    if got is None:
                        continue
                    uniform = _pipeline(f, cluster, global_batch, micro, accum, ac, even_layers, budget)
                    layout = Layout(1, dp, 1, pp, micro, accum, ac, "1f1b")
                    plans.append(
                        HeteroPlan(
                            "pipeline",
                            layout,
                            layers,
                            even_layers,
                            tokens / got[0],
                            tokens / uniform[0] if uniform else 0.0,
                            got[1],
                            got[2],
                        )
                    )
    return plans


def local_shares(per_seq_s: list[float], fixed_s: list[float], global_batch: int, accum: int = 1) -> list[int] | None:
    """Sequences per rank for processes of this machine whose step costs fixed_s[r] + n x
    per_seq_s[r] (a throttled rank has both scaled): the split that minimises the slowest rank;
    None when no split gives every rank `accum` sequences or a multiple of it."""
    world = len(per_seq_s)
    if world == 1:
        return [global_batch]
    best, best_time = None, float("inf")
    for first in range(accum, global_batch - accum * (world - 1) + 1, accum):
        rest = split_by_speed(global_batch - first, [1 / s for s in per_seq_s[1:]], minimum=accum, unit=accum)
        if rest is None:
            continue
        split = [first, *rest]
        t = max(fx + n * s for fx, n, s in zip(fixed_s, split, per_seq_s))
        if t < best_time:
            best, best_time = split, t
    return best


def plan_mixed(cfg, cluster: Cluster, precision: str = "bf16") -> list[HeteroPlan]:
    """`kiln plan` for a mixed cluster: every data-parallel and pipeline plan that fits, fastest first."""
    from kiln.errors import ConfigError
    from kiln.plan.peak_memory import model_facts
    from kiln.plan.search import HEADROOM

    if cluster.local:
        raise ConfigError("a mixed cluster is planned from datasheet figures; local:N processes are one kind")
    f = model_facts(cfg, cfg.data.vocab_size, precision)
    return hetero_plans(f, cluster, cfg.global_batch, HEADROOM)


def explain_mixed(plans: list[HeteroPlan], cluster: Cluster, top: int = 3) -> list[str]:
    """Why the best plan wins: what the uniform split waits for, and how the runners-up compare."""
    if not plans:
        return ["no plan fits: a share or a stage does not fit the smallest device's memory"]
    names = [g.kind.name for g in cluster.groups]
    best = plans[0]
    group_times = ", ".join(f"{n} {t.total * 1e3:.1f} ms" for n, t in zip(names, best.times))
    lines = [
        f"best: {best.describe()} — {best.tokens_per_s:,.0f} tokens/s, {best.speedup:.2f}x its uniform split; "
        f"each group's step: {group_times} (split by speed, so they finish together)"
    ]
    if best.uniform_tokens_per_s:
        lines.append(
            f"  the uniform split waits for the slowest group every step: {best.uniform_tokens_per_s:,.0f} tokens/s"
        )
    for p in plans[1:top]:
        lines.append(f"  vs {p.describe()}: {p.tokens_per_s / best.tokens_per_s - 1:+.1%}")
    other = next((p for p in plans if p.shape != best.shape), None)
    if other is not None:
        lines.append(
            f"{other.shape} parallel across the groups: best {other.tokens_per_s / best.tokens_per_s - 1:+.1%} "
            f"({other.describe()})"
        )
    elif best.shape == "data":
        lines.append("pipeline across the groups: needs groups of equal size (one stage per group) and a fitting split")
    return lines
