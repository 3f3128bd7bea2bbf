"""kill -9 at any moment (in a step, while writing a checkpoint, while preparing data, while
logging), then `kiln train --resume`: the run finishes with exactly the losses of a run that was
never interrupted. Also: torchrun's elastic restart after a rank dies, and the hang watchdog."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import read_jsonl, tiny_overrides, write_corpus

PLUGIN = str(Path(__file__).with_name("kill_plugin.py"))
# layer_stats on as well: a stateful monitoring callback must not break exact resume
ENABLE = ["--set", 'callbacks.enabled=["kill", "layer_stats"]', "--set", "callbacks.layer_stats.every=3"]


def kiln(
    args: list[str],
    mode: str = "none",
    n: int = 0,
    nproc: int = 1,
    extra_env: dict | None = None,
    torchrun_args: list[str] = (),
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """`kiln ARGS` with the kill plugin loaded, armed by KILN_KILL=mode:n."""
    env = dict(os.environ, KILN_QUIET="1", OMP_NUM_THREADS="1", KILN_KILL=f"{mode}:{n}", **(extra_env or {}))
    args = [args[0], "--plugin", PLUGIN, *args[1:]]
    if nproc == 1:
        cmd = [sys.executable, "-m", "kiln", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *torchrun_args,
            "-m",
            "kiln",
            *args,
        ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    overrides = tiny_overrides(root, write_corpus(root / "corpus")) + ["checkpoint.every=4", "train.steps=20"]
    sets = [a for o in overrides for a in ("--set", o)] + ENABLE
    runs = root / "runs"
    ref = kiln(["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", "reference", *sets])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert read_jsonl(runs / "reference" / "layer_stats.jsonl")
    return root, runs, sets, read_jsonl(runs / "reference" / "metrics.jsonl")


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


rng = random.Random(7)
KILL_POINTS = [
    ("step", rng.randint(2, 19)),
    ("step", rng.randint(2, 19)),
    ("save_file", 4),
    ("save_file", 2),
    ("fsync", 3),
    ("fsync", 11),
    ("metrics", rng.randint(2, 19)),
    ("prepare", 0),
]


@pytest.mark.parametrize("mode, n", KILL_POINTS)
def test_kill_then_resume_is_exact(setup, mode, n):
    root, runs, sets, reference = setup
    name = f"kill-{mode}-{n}"
    base = ["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", name, *sets]
    if mode == "prepare":
        base[base.index(f"data.cache_dir={root / 'cache'}")] = f"data.cache_dir={root / 'cache-prepare'}"
    killed = kiln(base, mode, n)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = runs / name
    if not (run / "config.toml").is_file():  # killed before the run existed: start it again
        again = kiln(base)
    else:
        again = kiln(["train", "--resume", str(run)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(run) == [r["loss"] for r in reference]  # bit for bit
    assert read_jsonl(run / "layer_stats.jsonl") == read_jsonl(runs / "reference" / "layer_stats.jsonl")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 21))
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.fixture(scope="module")
def two_ranks(setup):
    """The uninterrupted 2-rank run the elastic tests compare with."""
    root, runs, sets, _ = setup
    whole = kiln(["train", "--preset", "tiny", "--runs-dir", str(runs), *sets, "--name", "two-ranks"], nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return losses(runs / "two-ranks")


def test_elastic_restart_after_a_rank_dies(setup, two_ranks):
    root, runs, sets, _ = setup
    args = ["train", "--preset", "tiny", "--runs-dir", str(runs), *sets]
    proc = kiln(
        args + ["--name", "elastic"],
        "step",
        10,
        nproc=2,
        extra_env={"RANK_TO_KILL": "1"},
        torchrun_args=["--max-restarts=1"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exitcode: -9" in proc.stderr  # rank 1 really died, and torchrun restarted the job
    assert losses(runs / "elastic") == two_ranks  # resumed from step 8, exactly
    assert (runs / "elastic" / "summary.json").is_file()


def test_elastic_restart_without_a_name_resumes_the_same_run(setup, two_ranks):
    """torchrun restarts the job; without --name the restarted attempt finds the run its first
    attempt created (by torchrun's job id) instead of starting a new one."""
    root, runs, sets, _ = setup
    fresh = root / "unnamed-runs"
    args = ["train", "--preset", "tiny", "--runs-dir", str(fresh), *sets]
    proc = kiln(args, "step", 10, nproc=2, extra_env={"RANK_TO_KILL": "1"}, torchrun_args=["--max-restarts=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exitcode: -9" in proc.stderr
    made = [p for p in fresh.iterdir() if p.is_dir()]
    assert len(made) == 1, made  # one run, resumed; not a second one
    assert losses(made[0]) == two_ranks
    assert (made[0] / "summary.json").is_file()


def test_hang_watchdog_dumps_stacks_and_exits(setup):
    root, runs, sets, _ = setup
    proc = kiln(
        [
            "train",
            "--preset",
            "tiny",
            "--runs-dir",
            str(runs),
            "--name",
            "hang",
            *sets,
            "--set",
            "guard.hang_min_s=3",
            "--set",
            "guard.hang_factor=5",
        ],
        "hang",
        8,
        timeout=120,
    )
    assert proc.returncode == 75
    assert "stacks written to" in proc.stderr
    dump = (runs / "hang" / "hang-rank0.txt").read_text()
    assert "time.sleep" in dump or "on_after_backward" in dump
    assert "a training step running for" in dump
