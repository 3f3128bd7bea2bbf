"""Validate Kiln on one GPU (an H100 or H200) in a few minutes: `make gpu-check`.

    python bench/gpu_check.py                       # every phase, results appended to gpu-check.json
    python bench/gpu_check.py --only gpt2,resume    # rerun some phases
    python bench/gpu_check.py --dry-run --out x.json   # every phase on the CPU at toy sizes (a test)

Phases, in order: env (versions, the bf16 matmul ceiling), gpu_tests (the tests that need CUDA),
gpt2 (gpt2-124m, bf16, compiled: tokens/s, MFU, host syncs, graph breaks), llama1b (4 layers of
llama-1b: kernel backends torch / triton, float8 tensorwise), loss_memory (chunked against naive
cross-entropy at a 128k vocabulary), resume (kill -9 and resume, deterministic and not),
nccl_fsdp (a one-rank NCCL group: FSDP2, async distributed checkpoint, resume, kiln export).

Each phase runs in its own process (this file with --phase NAME) under a time limit; a phase past
its limit is killed with everything it started and recorded as `timeout`. Each finished phase
appends one record to the JSON list in --out: name, status (ok | failed | skipped | timeout),
seconds, reason, metrics, device, versions. The exit code is 0 when every phase is ok or skipped.
docs/gpu-check.md says how to get Kiln and its missing packages onto a GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("env", "gpu_tests", "gpt2", "llama1b", "loss_memory", "resume", "nccl_fsdp")
HIDDEN = ("_sleep",)  # test-only: a phase that overstays its limit (tests/unit/test_gpu_check.py)
STATUSES = ("ok", "failed", "skipped", "timeout")
PHASE_TIMEOUT_S = 90.0
# 6 minutes of device time, of which a machine's start takes one to two
TOTAL_TIMEOUT_S = 270.0
RECORD_KEYS = (
    "name",
    "status",
    "seconds",
    "reason",
    "metrics",
    "device",
    "python",
    "torch",
    "cuda",
    "triton",
    "dry_run",
    "run_id",
    "limit_s",
    "log_tail",
)

# Settings every training run shares: fixed length, evaluation and sampling only at the end and
# as small as they go, no plot; the data is the built-in `stdlib` corpus (no network).
QUIET = [
    "train.time_budget_s=0",
    "eval.every=0",
    "eval.batches=1",
    "eval.sample_tokens=1",
    'eval.prompts=["def "]',
    "log.plot=false",
    "data.corpus=stdlib",
]
# Dry run: every model shrunk to seconds on two CPU cores, all sharing one small prepared dataset.
DRY_DATA = ["data.max_docs=40", "data.vocab_size=320"]
DRY_MODEL = ["model.n_layers=2", "model.n_heads=4", "model.d_model=64", "model.seq_len=64"]
DRY_TRAIN = ["train.device=cpu", "train.precision=fp32", "train.batch_tokens=0", "train.batch_size=4"]
DRY_TRAIN += ["train.micro_batch_size=0", "train.compile=false", "schedule.warmup_steps=1", "log.every=1"]
DRY = DRY_DATA + DRY_MODEL + DRY_TRAIN
GPU = ["train.device=cuda", "train.precision=bf16"]

# Real sizes (on an H100 / H200), one place to retune them.
GPT2_REAL = ["train.steps=40", "train.batch_tokens=0", "train.batch_size=16", "train.micro_batch_size=16"]
GPT2_REAL += ["train.compile=true", "log.every=10", "schedule.warmup_steps=10"]
LLAMA_REAL = ["model.n_layers=4", "train.steps=20", "train.batch_tokens=0", "train.batch_size=4"]
# eager: compiling each of three variants would not fit the phase's 90 s
LLAMA_REAL += ["train.micro_batch_size=4", "train.compile=false", "log.every=5", "schedule.warmup_steps=5"]
# resume and nccl_fsdp: the tiny model on llama1b's prepared data (one tokenizer fewer to train)
SMALL_REAL = ["data.vocab_size=32000", "train.batch_size=16", "train.compile=false", "log.every=1"]
SMALL_REAL += ["schedule.warmup_steps=2"]
LOSS_REAL = {"vocab": 128256, "tokens": 8192, "dim": 2048}
LOSS_DRY = {"vocab": 512, "tokens": 256, "dim": 64}


class Skip(Exception):
    """The phase cannot run here (a missing package, no CUDA). Args: the reason, and optionally
    the metrics gathered so far."""


class PhaseFailure(Exception):
    """The phase ran and found something wrong. Args: the reason, and optionally the metrics."""


# ---------------------------------------------------------------------------------------------
# helpers shared by the phases (run inside a phase's process)


def now_id() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tail(text: str, chars: int = 2000) -> str:
    return text[-chars:]


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lines(path: Path) -> int:
    """Complete lines in a file another process is appending to."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def device_info() -> dict[str, Any]:
    """Device name and versions, read once torch is imported (every phase imports it)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": version_of("triton"),
    }


def fresh(folder: Path) -> Path:
    """An empty folder for a phase's runs (a rerun with the same --work keeps only the data cache)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def kiln_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", *args]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_logged(cmd: list[str], log: Path, timeout: float) -> None:
    """Run `cmd` (output to `log`); a non-zero exit is a PhaseFailure quoting the log's end."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        raise PhaseFailure(f"`{' '.join(cmd[2:5])} ...` exited {proc.returncode}: {tail(log.read_text(), 600)}")


def kiln_in_process(args: list[str]) -> None:
    """`kiln ARGS` in this process (cheaper than a new one; torch's in-process counters stay readable)."""
    from kiln.cli import main

    code = main(args)
    if code:
        raise PhaseFailure(f"kiln {' '.join(args[:3])} ... exited {code} (see the phase's log)")


def train(args: list[str], log: Path, in_process: bool) -> None:
    """`kiln ARGS`: in this process for the dry run's seconds, else in a process of its own (a
    clean CUDA context, its own memory peak, no global flags left by an earlier run)."""
    if in_process:
        kiln_in_process(args)
    else:
        run_logged(kiln_cmd(*args), log, timeout=PHASE_TIMEOUT_S)


def summary_of(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    if not path.is_file():
        raise PhaseFailure(f"{run.name} wrote no summary.json")
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary


def throughput(run: Path) -> dict[str, Any]:
    """tokens/s, MFU, TFLOP/s and peak memory of a finished run (its summary, as bench/throughput.py)."""
    s = summary_of(run)
    records = jsonl(run / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise PhaseFailure(f"{run.name}: non-finite or missing losses {losses[:5]}")
    # debug.count_syncs: each record counts the syncs since the one before
    syncs = [(r["step"], r["host_syncs"]) for r in records if "host_syncs" in r]
    per_step = None
    if len(syncs) >= 2:
        per_step = syncs[-1][1] / max(1, syncs[-1][0] - syncs[-2][0])
    return {
        "tokens_per_s": s.get("tokens_per_s"),
        "mfu": s.get("mfu"),
        "tflops": s.get("tflops"),
        "peak_tflops": s.get("peak_tflops"),
        "peak_mem_gb": s.get("peak_mem_gb"),
        "steps": s.get("steps"),
        "precision": s.get("precision"),
        "compile": s.get("compile"),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        # the last logged interval's (steady state); None where this Kiln does not count them
        "host_syncs": syncs[-1][1] if syncs else None,
        "host_syncs_per_step": per_step,
        "graph_breaks": s.get("graph_breaks"),
    }


def need_cuda(dry: bool) -> None:
    import torch

    if not dry and not torch.cuda.is_available():
        raise Skip("no CUDA device (use --dry-run for the CPU rehearsal)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# phases: each takes (work dir, dry run) and returns its metrics, or raises Skip / PhaseFailure


def phase_env(work: Path, dry: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    m: dict[str, Any] = {
        "kiln": version_of("kiln") or "src (not installed)",
        "kiln_path": str(Path(importlib.import_module("kiln").__file__ or "").parent),
        "torchao": version_of("torchao"),
        "zstandard": version_of("zstandard"),
        "numpy": version_of("numpy"),
        "nccl": None,
        "cuda_available": torch.cuda.is_available(),
    }
    with contextlib.suppress(ImportError):
        import triton

        m["triton_import"] = triton.__version__
    cuda = torch.cuda.is_available() and not dry
    if cuda:
        props = torch.cuda.get_device_properties(0)
        m.update(
            gpus=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / 2**30,
            nccl=".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else None,
            cudnn=torch.backends.cudnn.version(),
        )
    # the bf16 matrix-product ceiling that MFU is judged against (random data: zeros run faster)
    n, reps = (8192, 100) if cuda else (256, 5)  # on a GPU, ~0.15 s of products
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(10 if cuda else 2):  # cuBLAS's choice, and the clocks up from idle
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - t0
    m["matmul_n"] = n
    m["matmul_bf16_tflops"] = 2 * n**3 * reps / seconds / 1e12
    return m


CUDA_SKIP = r"pytest\.mark\.skipif\(\s*not torch\.cuda\.is_available\(\)"


def gpu_test_ids(root: Path = ROOT) -> list[str]:
    """The tests that need CUDA: functions under a `skipif(not torch.cuda.is_available()` mark
    (written out, or a name bound to it), and whole files that carry it as `pytestmark` or pick
    their device by CUDA availability (they run everything on it)."""
    ids: list[str] = []
    for path in sorted((root / "tests").rglob("test_*.py")):
        text = path.read_text()
        rel = path.relative_to(root).as_posix()
        names = set(re.findall(rf"^(\w+)\s*=\s*{CUDA_SKIP}", text, re.M))
        if "pytestmark" in names or re.search(r"""["']cuda["'] if torch\.cuda\.is_available\(\)""", text):
            ids.append(rel)
            continue
        marks = "|".join([CUDA_SKIP, *(rf"{re.escape(n)}\b" for n in names)])
        tests = re.findall(rf"^@(?:{marks}).*\n(?:@.*\n)*def (test_\w+)", text, re.M)
        ids += [f"{rel}::{name}" for name in tests]
    return ids


def phase_gpu_tests(work: Path, dry: bool) -> dict[str, Any]:
    import torch

    ids = gpu_test_ids()
    m: dict[str, Any] = {"tests": ids}
    if not ids:
        raise PhaseFailure("found no CUDA-only tests under tests/")
    if dry or not torch.cuda.is_available():
        raise Skip(f"{'dry run' if dry else 'no CUDA device'}: would run {len(ids)} test ids", m)
    log = work / "gpu_tests.pytest.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-rfEs", *ids]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    out = log.read_text()
    counted = r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)"
    summary = next((line for line in reversed(out.splitlines()) if re.search(counted, line)), "")
    for count, what in re.findall(counted, summary):
        m[what.rstrip("s") if what.startswith("error") else what] = int(count)
    skipped = re.findall(r"SKIPPED \[\d+\] (.*)", out)
    m["skip_reasons"] = skipped[:5]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        failed = re.findall(r"^(?:FAILED|ERROR) (.*)$", out, re.M)
        raise PhaseFailure(f"pytest exited {proc.returncode}: {'; '.join(failed[:4]) or tail(out, 400)}", m)
    return m


def graph_breaks() -> dict[str, Any]:
    """torch.compile's graph breaks in this process (counted by dynamo as it traces); None when
    nothing was compiled."""
    if "torch._dynamo" not in sys.modules:
        return {"graph_breaks": None}
    from torch._dynamo.utils import counters

    reasons = counters["graph_break"]
    return {
        "graph_breaks": sum(reasons.values()) if counters["stats"].get("unique_graphs") else None,
        "graph_break_reasons": [f"{n}x {r[:160]}" for r, n in reasons.most_common(3)],
    }


def phase_gpt2(work: Path, dry: bool) -> dict[str, Any]:
    need_cuda(dry)
    size = DRY + ["train.steps=3"] if dry else GPU + GPT2_REAL
    runs = fresh(work / "runs" / "gpt2")
    args = ["train", "--preset", "gpt2-124m", "--runs-dir", str(runs), "--name", "gpt2"]
    args += sets([*QUIET, f"data.cache_dir={work / 'cache'}", "checkpoint.every=0", *size])
    args += sets(["debug.count_syncs=true"])
    kiln_in_process(args)  # in this process: dynamo's graph-break counters are read below
    m = throughput(runs / "gpt2")
    if m["compile"]:
        dynamo = graph_breaks()
        if m["graph_breaks"] is not None:  # Kiln's summary counts them (where it does); dynamo says why
            dynamo.pop("graph_breaks")
        m.update(dynamo)
    return m


def phase_llama1b(work: Path, dry: bool) -> dict[str, Any]:
    """llama-1b cut to 4 layers: the kernel backends and float8, each variant in its own process."""
    need_cuda(dry)
    variants = {"torch": ["kernels.backend=torch"]}
    skipped: dict[str, str] = {}
    if dry:
        skipped["triton"] = skipped["float8"] = "dry run: backend torch only"
    else:
        if have("triton"):
            variants["triton"] = ["kernels.backend=triton"]
        else:
            skipped["triton"] = "triton is not installed"
        if have("torchao"):
            variants["float8"] = ["kernels.backend=torch", "kernels.float8=tensorwise"]
        else:
            skipped["float8"] = "torchao is not installed (docs/gpu-check.md: carry its wheel)"
    base = DRY + ["train.steps=3", "model.n_kv_heads=2", "model.d_ff=128"] if dry else GPU + LLAMA_REAL
    m: dict[str, Any] = {"variants": {}, "skipped": skipped, "failed": {}}
    runs = fresh(work / "runs" / "llama1b")
    for name, extra in variants.items():
        args = ["train", "--preset", "llama-1b", "--runs-dir", str(runs), "--name", f"llama-{name}"]
        args += sets([*QUIET, f"data.cache_dir={work / 'cache'}", "checkpoint.every=0", *base, *extra])
        try:  # one variant's failure does not hide the others' figures
            train(args, work / f"llama-{name}.log", in_process=dry)
            m["variants"][name] = throughput(runs / f"llama-{name}")
        except PhaseFailure as e:
            m["failed"][name] = str(e.args[0])
    first = m["variants"].get("torch", {})
    m["tokens_per_s"], m["mfu"] = first.get("tokens_per_s"), first.get("mfu")
    for name, r in m["variants"].items():
        if name != "torch" and r["tokens_per_s"] and m["tokens_per_s"]:
            m[f"speedup_{name}"] = r["tokens_per_s"] / m["tokens_per_s"]
    if m["failed"]:
        raise PhaseFailure("; ".join(f"{k}: {v[:300]}" for k, v in m["failed"].items()), m)
    return m


def phase_loss_memory(work: Path, dry: bool) -> dict[str, Any]:
    """Peak memory and time of the naive head (full logits, F.cross_entropy) against Kiln's
    chunked linear + cross-entropy, forward and backward, at a Llama-3 vocabulary."""
    import torch
    import torch.nn.functional as F

    from kiln.kernels.cross_entropy import chunked_linear_cross_entropy

    need_cuda(dry)
    cuda = torch.cuda.is_available() and not dry
    size = LOSS_DRY if dry else LOSS_REAL
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    # float32 master weights under bf16 autocast, as in training (CPU: float32 throughout)
    hidden = torch.randn(size["tokens"], size["dim"], device=device, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(size["vocab"], size["dim"], device=device, generator=gen)).requires_grad_()
    targets = torch.randint(0, size["vocab"], (size["tokens"],), device=device, generator=gen)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()

    def naive() -> torch.Tensor:
        with autocast:
            logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def chunked(fused: bool) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            with autocast:
                return chunked_linear_cross_entropy(hidden, weight, targets, chunk=1024, fused=fused)[0]

        return loss

    variants = {"naive": naive, "chunked": chunked(False)}
    if cuda and have("triton"):
        variants["chunked_fused"] = chunked(True)
    m: dict[str, Any] = dict(size)
    grads: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, fn in variants.items():
        reps = 5 if cuda else 2
        times = []
        for i in range(reps + 1):  # the first is a warm-up (Triton compiles, cuBLAS picks kernels)
            hidden.grad = weight.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        m[f"{name}_ms"] = 1e3 * sorted(times)[len(times) // 2]
        m[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
        assert hidden.grad is not None and weight.grad is not None
        grads[name] = (loss.detach().float(), hidden.grad.float(), weight.grad.float())
        del loss
    ref = grads["naive"]
    for name, got in grads.items():
        if name != "naive":
            rel = max(float((g - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(got, ref))
            m[f"{name}_rel_err"] = rel
            if not rel < (2e-2 if cuda else 1e-4):  # bf16 products against bf16 logits; NaN fails too
                raise PhaseFailure(f"{name} differs from the naive loss or gradients by {rel:.3g} (relative)", m)
    if cuda:
        m["memory_saving"] = m["naive_peak_gib"] / max(m["chunked_peak_gib"], 1e-9)
    return m


def _compare(ref: list[float], got: list[float]) -> dict[str, Any]:
    n = min(len(ref), len(got))
    diffs = [abs(a - b) for a, b in zip(ref[:n], got[:n])]
    return {"steps": n, "identical": ref == got, "max_abs_diff": max(diffs) if diffs else None}


def _kill_and_resume(
    work: Path, name: str, base: list[str], steps: int, every: int, kill_at: int, dry: bool
) -> dict[str, Any]:
    """An uninterrupted run, then the same run killed (SIGKILL) inside step `kill_at` after its
    checkpoint at `every`, resumed with `kiln train --resume`; their losses compared."""
    runs, cache = work / "runs" / "resume", work / "cache"
    common = [*QUIET, f"data.cache_dir={cache}", f"train.steps={steps}", f"checkpoint.every={every}", *base]
    ref_args = ["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", f"{name}-ref", *sets(common)]
    train(ref_args, work / f"{name}-ref.log", in_process=dry)
    # the `hang` fault blocks step `kill_at` (after the checkpoint): a kill -9 in mid-step, on cue
    killed = runs / name
    args = ["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", name]
    args += sets([*common, f"faults.hang={kill_at}", "faults.hang_s=3600"])
    with open(work / f"{name}-killed.log", "w") as log:
        proc = subprocess.Popen(kiln_cmd(*args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        manifest = killed / "checkpoints" / f"step-{every:08d}" / "manifest.json"
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while not (manifest.is_file() and lines(killed / "metrics.jsonl") >= kill_at - 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise PhaseFailure(f"{name}: the run to be killed ended or stalled before step {kill_at}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resume = ["train", "--resume", str(killed), *sets(["faults.hang=0"])]
    train(resume, work / f"{name}-resumed.log", in_process=dry)
    ref = [r["loss"] for r in jsonl(runs / f"{name}-ref" / "metrics.jsonl")]
    got = [r["loss"] for r in jsonl(killed / "metrics.jsonl")]
    if len(got) != steps:
        raise PhaseFailure(f"{name}: the resumed run logged {len(got)} of {steps} steps")
    before, after = _compare(ref[:every], got[:every]), _compare(ref[every:], got[every:])
    return {
        "identical": ref == got,
        "max_abs_diff": max(before["max_abs_diff"] or 0.0, after["max_abs_diff"] or 0.0),
        # before the checkpoint the two runs share nothing: any difference there is run-to-run noise
        "max_abs_diff_before_kill": before["max_abs_diff"],
        "max_abs_diff_after_resume": after["max_abs_diff"],
    }


def phase_resume(work: Path, dry: bool) -> dict[str, Any]:
    need_cuda(dry)
    if dry:
        base, steps, every, kill_at = DRY, 6, 3, 5
        modes = {"deterministic": True}  # the CPU is deterministic anyway: one pair is enough
    else:
        base, steps, every, kill_at = GPU + SMALL_REAL, 16, 8, 11
        modes = {"deterministic": True, "nondeterministic": False}
    m: dict[str, Any] = {}
    fresh(work / "runs" / "resume")
    for mode, on in modes.items():
        flag = f"train.deterministic={str(on).lower()}"
        m[mode] = _kill_and_resume(work, f"resume-{mode}", [*base, flag], steps, every, kill_at, dry)
    m["deterministic_identical"] = m["deterministic"]["identical"]
    if "nondeterministic" in m:
        m["nondeterministic_max_abs_diff"] = m["nondeterministic"]["max_abs_diff"]
    if not m["deterministic"]["identical"]:
        raise PhaseFailure(
            f"train.deterministic=true: resumed losses differ by up to {m['deterministic']['max_abs_diff']:.3g}", m
        )
    return m


def force_one_rank_fsdp(side: Path) -> None:
    """Make Kiln treat a one-process job as distributed: a real process group (NCCL for CUDA
    tensors, gloo for CPU ones), FSDP2 over the one rank, distributed checkpoints. Kiln only
    shards from two data-parallel ranks, and NCCL refuses two ranks on one GPU, so a one-GPU
    check of those code paths has to ask for them. What was set up is written to `side`."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import kiln.parallel.mesh as mesh
    import kiln.parallel.runtime as runtime
    import kiln.train.build as build
    from kiln.parallel.apply import apply_fsdp

    seen: dict[str, Any] = {}

    def note(**kw: Any) -> None:
        seen.update(kw)
        side.write_text(json.dumps(seen))

    def init_one_rank(info: Any, timeout_s: float = 600.0) -> None:
        if dist.is_initialized():
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(mesh.backend_for(cuda), rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))
        note(backend=str(dist.get_backend()), world_size=dist.get_world_size())

    original = build.parallelize
    fsdp_options = inspect.signature(apply_fsdp).parameters

    def parallelize_fsdp(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        bound = inspect.signature(original).bind(*args, **kwargs).arguments
        model, spec, dmesh = bound["model"], bound["spec"], bound["mesh"]
        # whatever else both take (FSDP's mixed precision, say) is passed on as Kiln would
        extra = {k: v for k, v in bound.items() if k in fsdp_options and k not in ("model", "blocks", "dp_mesh")}
        apply_fsdp(model, spec.block_list(model), dmesh["dp_shard"], **extra)
        note(fsdp=all(isinstance(p, DTensor) for p in model.parameters()))
        return model

    cast(Any, runtime).init_process_group = init_one_rank
    cast(Any, mesh.ParallelDims).distributed = property(lambda self: True)
    cast(Any, build).parallelize = parallelize_fsdp


_forced: list[bool] = []


def fsdp_rank(work: Path, args_file: Path) -> int:
    """One rank of the nccl_fsdp phase's job (torchrun's process, or the dry run's phase process)."""
    if not _forced:  # once a process: the dry run runs both jobs in one
        force_one_rank_fsdp(work / "fsdp-side.json")
        _forced.append(True)
    from kiln.cli import main

    return main(json.loads(args_file.read_text()))


def phase_nccl_fsdp(work: Path, dry: bool) -> dict[str, Any]:
    need_cuda(dry)
    import torch.distributed as dist

    if not dry and not dist.is_nccl_available():
        raise Skip("this torch has no NCCL")
    run = fresh(work / "runs" / "nccl_fsdp") / "fsdp"
    (work / "fsdp-side.json").unlink(missing_ok=True)
    base = DRY if dry else GPU + SMALL_REAL
    common = [*QUIET, f"data.cache_dir={work / 'cache'}", "checkpoint.every=2", "parallel.async_checkpoint=true"]
    jobs = {
        "train": ["train", "--preset", "tiny", "--runs-dir", str(run.parent), "--name", run.name]
        + sets([*common, *base, "train.steps=4"]),
        "resume": ["train", "--resume", str(run), *sets(["train.steps=6"])],
    }
    for name, args in jobs.items():
        args_file = work / f"fsdp-{name}.json"
        args_file.write_text(json.dumps(args))
        if dry:  # one process, no torchrun: the same code, gloo only, seconds cheaper
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
            os.environ.update(env, LOCAL_RANK="0")
            if fsdp_rank(work, args_file):
                raise PhaseFailure(f"the one-rank FSDP {name} failed (see the phase's log)")
        else:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
            cmd = [*torchrun, str(Path(__file__).resolve()), "--phase", "_fsdp_rank", "--work", str(work)]
            run_logged([*cmd, "--args-file", str(args_file)], work / f"fsdp-{name}.log", timeout=PHASE_TIMEOUT_S)
    side = json.loads((work / "fsdp-side.json").read_text())
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    m: dict[str, Any] = {**side, "checkpoints": ckpts}
    m["dcp"] = all((run / "checkpoints" / c / "dcp").is_dir() for c in ckpts)
    steps = [r["step"] for r in jsonl(run / "metrics.jsonl")]
    m["steps"] = steps[-1] if steps else None
    out = work / "export.safetensors"
    export = ["export", str(run), "--out", str(out)]
    if dry:
        kiln_in_process(export)
    else:
        run_logged(kiln_cmd(*export), work / "fsdp-export.log", timeout=PHASE_TIMEOUT_S)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        m["export_tensors"] = len(list(f.keys()))
    m["export_mb"] = out.stat().st_size / 2**20
    problems = [
        what
        for what, bad in (
            ("no FSDP", not m.get("fsdp")),
            ("not a distributed checkpoint", not m["dcp"]),
            ("the resume did not reach step 6", m["steps"] != 6),
            ("no NCCL in the process group", not dry and "nccl" not in str(m.get("backend"))),
        )
        if bad
    ]
    if problems:
        raise PhaseFailure("; ".join(problems), m)
    return m


def phase_sleep(work: Path, dry: bool) -> dict[str, Any]:
    """Test only: overstays any small limit, with a child process that must die with it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (work / "sleep-child.pid").write_text(str(child.pid))
    time.sleep(60)
    return {}


PHASE_FUNCS: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "env": phase_env,
    "gpu_tests": phase_gpu_tests,
    "gpt2": phase_gpt2,
    "llama1b": phase_llama1b,
    "loss_memory": phase_loss_memory,
    "resume": phase_resume,
    "nccl_fsdp": phase_nccl_fsdp,
    "_sleep": phase_sleep,
}
# the figures each phase's progress line shows
HEADLINES = {
    "env": ("device", "matmul_bf16_tflops", "torchao", "zstandard"),
    "gpu_tests": ("passed", "failed", "skipped"),
    "gpt2": ("tokens_per_s", "mfu", "host_syncs_per_step", "graph_breaks"),
    "llama1b": ("tokens_per_s", "mfu", "speedup_triton", "speedup_float8"),
    "loss_memory": ("naive_peak_gib", "chunked_peak_gib", "naive_ms", "chunked_ms"),
    "resume": ("deterministic_identical", "nondeterministic_max_abs_diff"),
    "nccl_fsdp": ("backend", "fsdp", "dcp", "export_tensors"),
    "preflight": ("kiln_from", "wheels"),
}


def run_phase(name: str, work: Path, dry: bool, result: Path) -> int:
    """Inside a phase's process: run it and write its partial record to `result`."""
    record: dict[str, Any] = {"status": "ok", "reason": None, "metrics": {}}
    try:
        record["metrics"] = PHASE_FUNCS[name](work, dry)
    except (Skip, PhaseFailure) as e:
        record["status"] = "skipped" if isinstance(e, Skip) else "failed"
        record["reason"] = str(e.args[0]) if e.args else type(e).__name__
        record["metrics"] = e.args[1] if len(e.args) > 1 else {}
    except Exception as e:  # anything else is a failure of the phase, with its traceback in the log
        traceback.print_exc()
        record["status"], record["reason"] = "failed", f"{type(e).__name__}: {str(e)[:600]}"
    with contextlib.suppress(Exception):
        record.update(device_info())
    result.write_text(json.dumps(record, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# the driver: preflight, one process per phase, limits, the JSON file


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), so a phase's torchrun workers, which start
    sessions of their own, die with it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    pids = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the phase runs in a session (and group) of its own
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def preflight(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Make Kiln importable by the phases: its source tree on PYTHONPATH where it is not
    installed, carried wheels (torchao, zstandard) installed into the work folder."""
    record: dict[str, Any] = {"name": "preflight", "status": "ok", "reason": None, "metrics": {}}
    m = record["metrics"]
    paths: list[str] = []
    if importlib.util.find_spec("kiln") is None:
        paths.append(str(ROOT / "src"))
        m["kiln_from"] = "src on PYTHONPATH"
    else:
        m["kiln_from"] = "installed"
    wheels = Path(args.wheels) if args.wheels else ROOT / "wheels"
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    m["wheels"] = [w.name for w in found]
    if found and not args.dry_run:
        site = work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        proc = subprocess.run([*cmd, "--target", str(site), *map(str, found)], capture_output=True, text=True)
        if proc.returncode:
            record["status"], record["reason"] = "failed", f"pip install of {wheels}: {tail(proc.stderr, 600)}"
        else:
            paths.append(str(site))
    elif args.wheels and not found:
        record["status"], record["reason"] = "failed", f"--wheels {wheels}: no .whl files there"
    if paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Kiln's own requirements (pyproject.toml) that the GPU image must already have; zstandard
    # is only imported for .zst corpora, torchao only by float8, low-bit AdamW and sparsity
    needed = {"torch", "numpy", "tokenizers", "safetensors", "rich", "matplotlib", "pyarrow", "sacrebleu", "PIL"}
    probe = "import importlib.util as u, sys; print(' '.join(n for n in sys.argv[1:] if u.find_spec(n) is None))"
    out = subprocess.run([sys.executable, "-c", probe, *sorted(needed | {"kiln"})], env=env, capture_output=True)
    missing = out.stdout.decode().split()
    m["missing"] = missing
    if missing and record["status"] == "ok":
        record["status"], record["reason"] = "failed", f"not importable: {', '.join(missing)} (docs/gpu-check.md)"
    return record


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, list):
        backup = path.with_suffix(path.suffix + ".bad")
        path.replace(backup)
        print(f"gpu-check: {path} was not a JSON list; moved to {backup}", file=sys.stderr)
        return []
    return data


def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append one record, rewriting the file atomically: a run killed midway keeps what it did."""
    records = read_results(path) + [record]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1, default=str) + "\n")
    tmp.replace(path)


def progress(record: dict[str, Any]) -> str:
    """One line: name, status, seconds and the phase's key figures (from its metrics or record)."""
    figures = []
    for key in HEADLINES.get(record["name"], ()):
        value = record["metrics"].get(key, record.get(key))
        if value is not None:
            figures.append(f"{key}={fmt(value)}")
    line = f"gpu-check {record['name']:<12} {record['status']:<8} {record['seconds']:6.1f}s  {' '.join(figures)}"
    if record["reason"]:
        line += f"  ({record['reason'][:300]})"
    return line


def drive(args: argparse.Namespace) -> int:
    names = list(PHASES)
    if args.only:
        asked = [n.strip() for n in args.only.split(",") if n.strip()]
        names = [n for n in (*PHASES, *HIDDEN) if n in asked] + [n for n in asked if n not in (*PHASES, *HIDDEN)]
        unknown = [n for n in names if n not in PHASES and n not in HIDDEN]
        if unknown:
            print(f"gpu-check: unknown phase {', '.join(unknown)}; phases: {', '.join(PHASES)}", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    run_id, started = now_id(), time.monotonic()
    env = dict(os.environ, KILN_QUIET="1", PYTHONUNBUFFERED="1")
    if args.dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")  # toy models: one thread is fastest, and leaves a core free
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal is the CPU's even on a GPU machine
    base = {
        "device": None,
        "python": platform.python_version(),
        "torch": version_of("torch"),
        "cuda": None,
        "triton": version_of("triton"),
        "dry_run": args.dry_run,
        "run_id": run_id,
        "log_tail": "",
    }
    pre = {**base, "limit_s": None, **preflight(args, work, env), "seconds": time.monotonic() - started}
    append_result(out, pre)
    print(progress(pre), flush=True)
    worst = 0 if pre["status"] == "ok" else 1
    for name in names:
        left = args.total_timeout - (time.monotonic() - started)
        limit = min(args.phase_timeout, left)
        record: dict[str, Any] = {**base, "name": name, "limit_s": limit, "metrics": {}, "reason": None}
        log = work / f"{name}.log"
        t0 = time.monotonic()
        if limit < min(5.0, args.phase_timeout):  # too little left to start a phase usefully
            record.update(status="skipped", reason=f"no time left of --total-timeout {args.total_timeout:g}s")
        else:
            result = work / f"{name}.result.json"
            result.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--work", str(work)]
            cmd += ["--result", str(result)] + (["--dry-run"] if args.dry_run else [])
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
                )
                try:
                    proc.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    kill_tree(proc)
                    record.update(status="timeout", reason=f"over its limit of {limit:.0f}s; killed")
                else:
                    kill_tree(proc)  # whatever the phase left running
                    if result.is_file():
                        record.update(json.loads(result.read_text()))
                    else:
                        record.update(status="failed", reason=f"the phase's process exited {proc.returncode}")
        record["seconds"] = time.monotonic() - t0
        if record["status"] in ("failed", "timeout") and log.is_file():
            record["log_tail"] = tail(log.read_text(errors="replace"))
        if record.get("device"):
            base["device"], base["cuda"], base["triton"] = record["device"], record["cuda"], record["triton"]
        append_result(out, record)
        print(progress(record), flush=True)
        worst = max(worst, 0 if record["status"] in ("ok", "skipped") else 1)
    total = time.monotonic() - started
    print(f"gpu-check: {'all ok' if not worst else 'FAILED'} in {total:.1f}s; records appended to {out}", flush=True)
    if worst:
        print(f"gpu-check: logs in {work}", flush=True)
    elif not args.work and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check.json", help="JSON list the records are appended to")
    ap.add_argument("--only", help=f"comma-separated phases ({', '.join(PHASES)})")
    ap.add_argument("--dry-run", action="store_true", help="every phase on the CPU at toy sizes")
    ap.add_argument("--phase-timeout", type=float, default=PHASE_TIMEOUT_S, help="seconds per phase")
    ap.add_argument("--total-timeout", type=float, default=TOTAL_TIMEOUT_S, help="seconds for all phases")
    ap.add_argument("--wheels", help="folder of .whl files to install first (default: ./wheels if present)")
    ap.add_argument("--work", help="folder for runs, data and logs (default: a temporary one, removed)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--args-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase == "_fsdp_rank":
        return fsdp_rank(Path(args.work), Path(args.args_file))
    if args.phase:
        return run_phase(args.phase, Path(args.work), args.dry_run, Path(args.result))
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
