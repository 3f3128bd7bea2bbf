"""`kiln plan profile`: measure what the time model needs on this machine, and cache it.

- Compute: one training step's forward and backward of the model (no optimizer) at several
  micro-batch sizes, with the thread counts the local layouts will use; a line
  t(micro-batch) = fixed + per_sequence x micro-batch is fitted per thread count (the fixed part
  is per-operation overhead, which dominates small models on a CPU), plus the optimizer's time per
  parameter.
- Collectives: all-gather and reduce-scatter between two processes of this machine over the
  backend the layouts will use (gloo here), fitted as alpha + bytes / beta.
Results go to KILN_HOME (~/.cache/kiln)/plan-profile.json, keyed by the model config and machine.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.config import Config


@dataclass(frozen=True)
class ComputeFit:
    fixed_s: float  # per micro-batch step of the whole model, whatever its size
    per_seq_s: float  # per sequence of the micro-batch
    optimizer_s_per_param: float


@dataclass(frozen=True)
class LinkFit:
    alpha_s: float
    gbps: float
    # what a parallel step costs beyond its compute and its collectives' bytes (hooks, copies,
    # DTensor dispatch), measured on two processes: per FSDP unit, and per tensor-parallel block,
    # each per micro-batch
    fsdp_unit_s: float = 0.0
    tp_block_s: float = 0.0
    tp_block_per_seq_s: float = 0.0  # the tensor-parallel overhead grows with the micro-batch


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs) or 1e-30
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def measure_compute(cfg: Config, vocab_size: int, threads: int, micro_batches: tuple[int, ...] = (1, 2, 4),
                    repeats: int = 3) -> ComputeFit:
    from kiln.model.registry import build_model, initialise
    from kiln.model.spec import padded_vocab

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        vocab = padded_vocab(vocab_size)
        model = initialise(build_model(cfg.model, vocab), cfg.model, 0)
        bf16 = cfg.train.precision == "bf16"
        times = []
        for mb in micro_batches:
            tokens = torch.randint(0, vocab, (mb, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0))
            best = float("inf")
            for _ in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(tokens[:, :-1])
                F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
                best = min(best, time.perf_counter() - start)
            times.append(best)
        fixed, per_seq = _fit_line([float(m) for m in micro_batches], times)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        opt.step()
        start = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        opt_s = (time.perf_counter() - start) / repeats / sum(p.numel() for p in model.parameters())
    finally:
        torch.set_num_threads(saved)
    return ComputeFit(max(fixed, 0.0), max(per_seq, 1e-9), opt_s)


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for n in sizes:
        shard = torch.zeros(n // 4 // world)
        full = torch.zeros(shard.numel() * world)
        best = float("inf")
        for _ in range(4):
            dist.barrier()
            start = time.perf_counter()
            dist.all_gather_single(full, shard) if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor(full, shard)
            dist.reduce_scatter_single(shard, full) if hasattr(dist, "reduce_scatter_single") else dist.reduce_scatter_tensor(shard, full)
            best = min(best, (time.perf_counter() - start) / 2)
        results.append((n, best))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def measure_link(world: int = 2, sizes: tuple[int, ...] = (2**12, 2**16, 2**20, 2**22, 2**24)) -> LinkFit:
    """All-gather / reduce-scatter time between `world` local gloo processes vs bytes."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "link.json")
        mp.spawn(_collective_worker, args=(world, port, list(sizes), out), nprocs=world, join=True)
        rows = json.loads(Path(out).read_text())
    # ring: (n-1)/n x bytes per step; fit t = alpha + moved / bandwidth
    moved = [n * (world - 1) / world for n, _ in rows]
    alpha, per_byte = _fit_line(moved, [t for _, t in rows])
    return LinkFit(max(alpha, 0.0), 1 / max(per_byte, 1e-15) / 1e9)


def _parallel_worker(rank: int, world: int, port: int, cfg_dict: dict, mode: str, micro: int, out: str) -> None:
    import torch.distributed as dist

    from kiln.config import from_dict
    from kiln.model.registry import build_model, get_spec
    from kiln.model.spec import padded_vocab
    from kiln.parallel.apply import materialise, parallelize
    from kiln.parallel.mesh import ParallelDims

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = from_dict(cfg_dict)
    dims = ParallelDims(1, world if mode == "fsdp" else 1, world if mode == "tp" else 1, 1, world)
    spec = get_spec(cfg.model.family)
    vocab = padded_vocab(cfg.data.vocab_size)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab)
    parallelize(model, spec, cfg, dims, dims.build_mesh("cpu"))
    model = materialise(model, spec, cfg, torch.device("cpu"))
    tokens = torch.randint(0, vocab, (micro, cfg.model.seq_len + 1), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(4):
        dist.barrier()
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        best = min(best, time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(best))
    dist.destroy_process_group()


def measure_parallel(cfg: Config, mode: str, micro: int) -> float:
    """The best forward + backward time of `cfg`'s model on two local gloo processes under FSDP
    (mode "fsdp") or tensor parallelism ("tp")."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    from kiln.config import to_dict

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "t.json")
        mp.spawn(_parallel_worker, args=(2, port, to_dict(cfg), mode, micro, out), nprocs=2, join=True)
        return float(json.loads(Path(out).read_text()))


def parallel_overheads(cfg: Config, one_thread: ComputeFit, link: LinkFit, micro: int = 4) -> LinkFit:
    """`link` with the FSDP and tensor-parallel costs that bytes and compute do not explain."""
    from kiln.plan.timing import _ring
    from kiln.scaling.flops import param_count

    m = cfg.model
    params = param_count(m, cfg.data.vocab_size)
    ring = lambda n_bytes: _ring(n_bytes, 2, link.gbps, link.alpha_s * 1e6)  # noqa: E731 - two ranks
    fsdp = measure_parallel(cfg, "fsdp", micro)
    expected = one_thread.fixed_s + one_thread.per_seq_s * micro + 3 * ring(params * 4)
    fsdp_unit = max(0.0, fsdp - expected) / (m.n_layers + 1)
    tp_fixed = tp_per_seq = 0.0
    if m.n_heads % 2 == 0 and (m.n_kv_heads or m.n_heads) % 2 == 0:
        extra = []
        micros = (max(1, micro // 2), micro * 2)
        for mb in micros:
            tp = measure_parallel(cfg, "tp", mb)
            act = mb * m.seq_len * m.d_model * 4
            expected = one_thread.fixed_s + one_thread.per_seq_s * mb / 2 + 8 * m.n_layers * ring(act)
            extra.append(max(0.0, tp - expected) / m.n_layers)
        tp_fixed, tp_per_seq = _fit_line([float(x) for x in micros], extra)
    return LinkFit(link.alpha_s, link.gbps, fsdp_unit, max(0.0, tp_fixed), max(0.0, tp_per_seq))


def _cache_path() -> Path:
    return Path(os.environ.get("KILN_HOME", Path.home() / ".cache" / "kiln")) / "plan-profile.json"


def profile_key(cfg: Config, threads: int) -> str:
    return f"{cfg.model!r}|{cfg.train.precision}|{threads}|{os.cpu_count()}"


def load_profile(cfg: Config, threads: int) -> tuple[ComputeFit, LinkFit] | None:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return None
    entry, link = data.get("compute", {}).get(profile_key(cfg, threads)), data.get("link")
    if entry is None or link is None:
        return None
    return ComputeFit(**entry), LinkFit(**link)


def run_profile(cfg: Config, vocab_size: int, thread_counts: tuple[int, ...], log=print) -> Path:
    path = _cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    for threads in thread_counts:
        fit = measure_compute(cfg, vocab_size, threads)
        data.setdefault("compute", {})[profile_key(cfg, threads)] = asdict(fit)
        log(f"compute, {threads} thread(s): {fit.fixed_s * 1e3:.1f} ms + {fit.per_seq_s * 1e3:.2f} ms per sequence; "
            f"optimizer {fit.optimizer_s_per_param * 1e9:.2f} ns per parameter")
    link = measure_link()
    one_thread = ComputeFit(**data["compute"][profile_key(cfg, 1)]) if profile_key(cfg, 1) in data.get("compute", {}) \
        else measure_compute(cfg, vocab_size, 1)
    link = parallel_overheads(cfg, one_thread, link)
    data["link"] = asdict(link)
    log(f"gloo all-gather / reduce-scatter: {link.alpha_s * 1e6:.0f} us + bytes / {link.gbps:.2f} GB/s; "
        f"FSDP {link.fsdp_unit_s * 1e3:.1f} ms per unit and TP {link.tp_block_s * 1e3:.1f} ms + "
        f"{link.tp_block_per_seq_s * 1e3:.1f} ms per sequence per block, per micro-batch")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path
