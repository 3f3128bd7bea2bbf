"""Checkpoint cost at a real size (issue 34): a ~310M-parameter decoder with its AdamW state
(~3.7 GB of fp32), saved by one process and by 2 FSDP ranks on gloo, synchronously and
asynchronously (`parallel.async_checkpoint`), through Kiln's own Checkpointer. Not part of `make test`.

    python bench/checkpoint_scale.py [--work DIR] [--layers 22] [--json out.json]

Each save's seconds are split into state-dict gathering, serialisation (the same save written
to /dev/null), write + fsync (the rest of the write and its flush, and the commit), and the
hashing that outlasted the write (files are hashed from the page cache while the disk flushes
them). Also: the same save with checksums switched off (the A/B of what hashing adds), what
re-hashing the whole checkpoint afterwards on one thread would have added (the way before), and
the disk's own write bandwidth at the same size (`dd if=/dev/zero bs=16M conv=fsync`, before and
after). Targets: hashing adds <= 10% to a save; a sync save reaches >= 60% of the disk's
bandwidth; an asynchronous save holds the step for <= 10% of a synchronous save's time. An
asynchronous save's host copy is made while the next step's forward and backward run (a real
one, of one short sequence: `STEP_TOKENS`), and the step's update waits for it as in the loop
(`Checkpointer.staged`): "step held" is the save call's return plus that wait, "host copy" how
long the copy took.

Each configuration runs in processes of its own (one, or torchrun's two); prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ----------------------------------------------------------------------------- one configuration
STEP_BATCH, STEP_TOKENS = 1, 16  # the step an asynchronous save overlaps: one sequence of 16 tokens a rank (~1 s)


def _setup(layers: int, async_save: bool):
    import torch

    from kiln.config import load_config
    from kiln.parallel.runtime import Parallel
    from kiln.train.build import build_parts
    from kiln.train.optim import build_optimizer
    from kiln.train.resolve import check_model

    torch.set_num_threads(1)
    overrides = [f"model.n_layers={layers}", "model.d_model=1024", "model.n_heads=16", "data.vocab_size=32000"]
    overrides += ["train.precision=fp32", "train.device=cpu", f"parallel.async_checkpoint={str(async_save).lower()}"]
    cfg = load_config(preset="tiny", overrides=overrides)
    par = Parallel.setup(cfg, torch.device("cpu"))
    parts, _, _ = build_parts(cfg, check_model(cfg), par, 32000, precision="fp32")
    optimizers = [build_optimizer(p, cfg.optim, par.device) for p in parts]
    torch.manual_seed(par.info.rank)
    for part, opt in zip(parts, optimizers):  # one step with random gradients: AdamW's state exists, not zeros
        for p in part.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)
    return cfg, par, parts, optimizers


def _serialise_to_null(par, parts, optimizers) -> float:
    """The same save's serialisation (and DCP's planning) with the bytes written to /dev/null:
    the best of two, each after the disk has taken what came before."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.filesystem import FileSystem

    from kiln.train import checkpoint as ckpt
    from kiln.train.checkpoint_writer import SplitWriter

    class NullFileSystem(FileSystem):
        def create_stream(self, path, mode):  # type: ignore[override]
            return open(os.devnull, "wb")

        def mkdir(self, path) -> None:
            pass

        def exists(self, path) -> bool:
            return False

        def rename(self, path, new_path) -> None:
            pass

        def rm_file(self, path) -> None:
            pass

    best = float("inf")
    for _ in range(2):
        os.sync()
        model_sd = ckpt.model_state(parts)
        optim_sd = ckpt.optimizer_state(parts, optimizers)
        par.barrier()
        t0 = time.perf_counter()
        if par.distributed:
            writer = SplitWriter(os.devnull, sync_files=False)  # CRC32 off, as Kiln's saves
            writer.fs = NullFileSystem()
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
        else:
            ckpt._save_optimizer(optim_sd, Path(os.devnull))
            save_file({k: v.detach().contiguous() for k, v in model_sd.items()}, os.devnull)
        par.barrier()
        best = min(best, time.perf_counter() - t0)
    return best


def _rehash_seconds(path: Path, rank: int, world: int) -> float:
    """What hashing every file after the save, on one thread of rank 0, costs (the way before)."""
    from kiln.fileio import checksum_file

    if rank:
        return 0.0
    t0 = time.perf_counter()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"):
        checksum_file(f, "sha256")
    return time.perf_counter() - t0


def run_config(work: Path, layers: int, async_save: bool, out: Path) -> None:
    """One configuration in this process (or in each of torchrun's): a first save (it allocates
    what later ones reuse), then saves with and without checksums alternately (H U U H H U U H H U), each
    after the disk has taken everything before it; rank 0 writes the results to `out`."""
    import statistics

    import torch

    import kiln.fileio as fileio
    from kiln.train.checkpoint import Checkpointer, list_checkpoints, read_state

    cfg, par, parts, optimizers = _setup(layers, async_save)
    rank, world = par.info.rank, par.info.world_size
    folder = work / "checkpoints"
    checkpointer = Checkpointer(folder, par, keep=1, async_save=async_save)
    real_hash = fileio.checksum_file
    tokens = torch.randint(0, 32000, (STEP_BATCH, STEP_TOKENS), generator=torch.Generator().manual_seed(0))

    def next_step() -> float:
        """What the loop does while an asynchronous save stages: the next step's forward and
        backward (its update waits for the copy: `Checkpointer.staged`, called by the loop)."""
        t0 = time.perf_counter()
        parts[0](tokens).float().mean().backward()
        for part in parts:
            part.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def save(step: int, hashed: bool) -> dict:
        fileio.checksum_file = real_hash if hashed else (lambda p, algorithm="": "0" * 32)
        try:
            os.sync()  # the previous save's writes are not this one's
            par.barrier()
            t0 = time.perf_counter()
            path = checkpointer.save(step, parts, optimizers, {"bench": True})
            returned = time.perf_counter() - t0
            step_seconds = next_step() if path is None else 0.0
            checkpointer.staged()  # where the loop's next update waits for an asynchronous save's copy
            while path is None:  # asynchronous: training would go on; poll as the loop does at logging steps
                time.sleep(0.05)
                path = checkpointer.poll()
        finally:
            fileio.checksum_file = real_hash
        stats = checkpointer.last_save
        assert stats is not None and read_state(path)["step"] == step
        figures = {k: v for k, v in vars(stats).items() if k != "started"}
        return {**figures, "returned_seconds": returned, "next_step_seconds": step_seconds}

    first = save(1, True)
    hashed, unhashed = [], []
    for i, with_hash in enumerate([True, False, False, True, True, False, False, True, True, False]):
        (hashed if with_hash else unhashed).append(save(2 + i, with_hash))
    typical = sorted(hashed, key=lambda r: r["seconds"])[len(hashed) // 2]  # the median save
    results = {
        "world": world,
        "async": async_save,
        "first": first,
        "hashed": hashed,
        "unhashed": unhashed,
        "save": typical,
        "hashed_seconds": statistics.median(r["seconds"] for r in hashed),
        "unhashed_seconds": statistics.median(r["seconds"] for r in unhashed),
        "rehash_seconds": _rehash_seconds(list_checkpoints(folder)[-1], rank, world),
        "serialise_seconds": _serialise_to_null(par, parts, optimizers),
    }
    if rank == 0:
        out.write_text(json.dumps(results))
    par.barrier()
    par.shutdown()


# ----------------------------------------------------------------------------- the driver
def params(layers: int) -> int:
    from kiln.config import load_config
    from kiln.scaling.flops import param_count

    cfg = load_config(preset="tiny", overrides=[f"model.n_layers={layers}", "model.d_model=1024", "model.n_heads=16"])
    return param_count(cfg.model, 32000)


def dd_bandwidth(work: Path, nbytes: int) -> float:
    """The disk's write bandwidth (bytes/s) for `nbytes` of zeros written and fsync'd by dd."""
    target = work / "dd.bin"
    count = max(1, -(-nbytes // (16 << 20)))
    proc = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fsync"],
        capture_output=True,
        text=True,
        check=True,
    )
    target.unlink()
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", proc.stderr)
    assert m, proc.stderr
    return int(m.group(1)) / float(m.group(2))


def run_child(work: Path, layers: int, world: int, async_save: bool) -> dict:
    out = work / f"result-{world}-{int(async_save)}.json"
    args = [str(Path(__file__).resolve()), "--child", "--work", str(work), "--layers", str(layers), "--out", str(out)]
    args += ["--async"] if async_save else []
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", KILN_QUIET="1")
    subprocess.run(cmd, env=env, check=True)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return json.loads(out.read_text())


def table(rows: list[dict], disk_bps: float) -> str:
    lines = [
        "| configuration | GB | gather s | serialise s | write + fsync s | hash s (not overlapped) | total s "
        "| GB/s (% of dd) | no checksums s | rehash after, 1 thread s | step held s | host copy s "
        "| overlapped step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["save"]
        gb = s["bytes"] / 1e9
        rest = s["seconds"] - s["gather_seconds"] - r["serialise_seconds"] - s["hash_seconds"]
        rate = s["bytes"] / s["seconds"]
        lines.append(
            f"| {r['name']} | {gb:.2f} | {s['gather_seconds']:.2f} | {r['serialise_seconds']:.2f} | {rest:.2f} "
            f"| {s['hash_seconds']:.2f} | {s['seconds']:.2f} | {rate / 1e9:.2f} ({100 * rate / disk_bps:.0f}%) "
            f"| {r['unhashed_seconds']:.2f} | {r['rehash_seconds']:.2f} | {s['blocking_seconds']:.2f} "
            f"| {s.get('staging_seconds', 0.0):.2f} | {s.get('next_step_seconds', 0.0):.2f} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict], disk_bps: float) -> list[str]:
    by = {r["name"]: r["save"] for r in rows}
    out = []
    for r in rows:
        s = r["save"]
        added = s["hash_seconds"] / max(s["seconds"] - s["hash_seconds"], 1e-9)
        ab = r["hashed_seconds"] / max(r["unhashed_seconds"], 1e-9) - 1
        out.append(f"- {r['name']}: hashing adds {100 * added:.1f}% (target <= 10%; A/B without: {100 * ab:+.1f}%)")
        if not r["async"]:
            share = s["bytes"] / s["seconds"] / disk_bps
            out.append(f"- {r['name']}: {100 * share:.0f}% of the disk's bandwidth (target >= 60%)")
    if "2 FSDP ranks, async" in by and "2 FSDP ranks, sync" in by:
        held = by["2 FSDP ranks, async"]["blocking_seconds"] / by["2 FSDP ranks, sync"]["seconds"]
        out.append(f"- async holds the step for {100 * held:.1f}% of a sync save (target <= 10%)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="a folder on the disk to measure (default: a temporary one in .)")
    ap.add_argument("--layers", type=int, default=22, help="22 layers of width 1024: ~311M parameters")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--async", dest="async_save", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_config(args.work, args.layers, args.async_save, args.out)
        return
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.work or Path.cwd()))
    try:
        before = dd_bandwidth(work, 12 * params(args.layers))  # fp32 weights and AdamW's two moments
        configs = [("1 process, sync", 1, False), ("2 FSDP ranks, sync", 2, False), ("2 FSDP ranks, async", 2, True)]
        rows = []
        for name, world, async_save in configs:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append({"name": name, **run_child(work, args.layers, world, async_save)})
        nbytes = rows[0]["save"]["bytes"]
        after = dd_bandwidth(work, nbytes)
        disk = (before + after) / 2
        print(table(rows, disk))
        print()
        print(f"disk (dd, {nbytes / 1e9:.2f} GB, conv=fsync): {before / 1e9:.2f} GB/s before, {after / 1e9:.2f} after")
        print("\n".join(verdicts(rows, disk)))
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "dd_bytes_per_s": [before, after]}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
