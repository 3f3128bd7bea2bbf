"""Helpers for the distributed tests: a small corpus, tiny layouts, and `kiln` run as a real
(torchrun) job."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

STEPS = 10
REL = 1e-5


def base_overrides(cache: Path, corpus: Path) -> list[str]:
    return [
        f"data.corpus={corpus}",
        f"data.cache_dir={cache}",
        "data.vocab_size=320",
        "model.n_layers=4",
        "model.d_model=64",
        "model.n_heads=4",
        "model.seq_len=32",
        f"train.steps={STEPS}",
        "train.time_budget_s=0",
        "train.batch_size=8",
        "train.precision=fp32",
        "log.every=1",
        "eval.every=5",
        "eval.batches=2",
        "checkpoint.every=5",
        "checkpoint.keep=0",
        "eval.sample_tokens=2",
        "log.plot=false",
        "schedule.warmup_steps=2",
    ]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_kiln(
    args: list[str], nproc: int = 1, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`kiln ARGS` on `nproc` ranks. One rank runs in this process (the single-process references
    and resumes: a new process would spend more time importing torch than training); a plugin's
    run (--plugin or KILN_PLUGINS) still gets a process of its own: a plugin registers itself for
    the life of the process that loads it, and so does a run given `env` (variables torch reads
    when it starts, such as ATEN_CPU_CAPABILITY)."""
    if nproc == 1 and "--plugin" not in args and not os.environ.get("KILN_PLUGINS") and env is None:
        return _run_in_process(args, check)
    env = dict(os.environ, KILN_QUIET="1", OMP_NUM_THREADS="1", **(env or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "kiln", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "kiln",
            *args,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _run_in_process(args: list[str], check: bool) -> subprocess.CompletedProcess:
    from kiln.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    if check and code:
        raise AssertionError(f"kiln {' '.join(args)} failed ({code}):\n{err.getvalue()[-4000:]}")
    return subprocess.CompletedProcess(["kiln", *args], code, out.getvalue(), err.getvalue())


def train(
    runs: Path, name: str, overrides: list[str], nproc: int = 1, env: dict[str, str] | None = None
) -> list[float]:
    run_kiln(["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", name, *sets(overrides)], nproc, env=env)
    return losses(runs / name)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= REL * abs(y), f"step {step}: {x} vs {y} (rel {abs(x - y) / abs(y):.2e})"


def write_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(40):
        lines = [" ".join(words[(i * 7 + j * k) % len(words)] for k in range(1, 9)) for j in range(60)]
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return corpus
