"""Checkpoint checksums at scale, on two gloo ranks (issue 34): at save each rank hashes only the
files it wrote; at load each rank verifies only the files it reads (the files no rank reads are
shared out), and a damaged file found by one rank makes every rank refuse that checkpoint together
and fall back to the previous one, with one warning line.

A plugin (tests/plugins/hash_log.py) logs which rank hashed which file, at save and at load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from dist_helpers import base_overrides, losses, sets, write_corpus

PLUGIN = str(Path(__file__).parents[1] / "plugins" / "hash_log.py")


def torchrun(args: list[str], log: Path) -> subprocess.CompletedProcess:
    """`kiln ARGS` on 2 ranks with the hash log, not quiet (rank 0 prints the warnings)."""
    env = {k: v for k, v in os.environ.items() if k != "KILN_QUIET"}
    env.update(OMP_NUM_THREADS="1", KILN_HASH_LOG=str(log))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kiln"]
    cmd += [args[0], "--plugin", PLUGIN, *args[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def hashed(log: Path, phase: str, rank: int, checkpoint: str) -> set[str]:
    """The files of `checkpoint` (relative to it) that `rank` hashed during `phase`."""
    out = set()
    for line in (log / f"rank{rank}.txt").read_text().splitlines():
        when, _, path = line.split(" ", 2)
        folder, _, rest = path.partition(f"/checkpoints/{checkpoint}")
        if when == phase and rest:
            out.add(rest.lstrip("/").split("/", 1)[1] if rest.startswith(".tmp") else rest.lstrip("/"))
    return out


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-rank FSDP run saved asynchronously at steps 5 and 10, with its hash log."""
    root = tmp_path_factory.mktemp("verify")
    base = base_overrides(root / "cache", write_corpus(root)) + ["parallel.async_checkpoint=true"]
    log = root / "log-train"
    runs = root / "runs"
    torchrun(["train", "--preset", "tiny", "--runs-dir", str(runs), "--name", "two", *sets(base)], log)
    return root, runs / "two", log


def test_no_rank_reads_back_another_ranks_files_at_save(saved):
    """Each rank hashed the files it wrote, and only those; every checksum in the manifest is right."""
    _, run, log = saved
    for step in (5, 10):
        name = f"step-{step:08d}"
        path = run / "checkpoints" / name
        files = json.loads((path / "manifest.json").read_text())["files"]
        assert all(xxhash.xxh3_128((path / f).read_bytes()).hexdigest() == m["xxh3_128"] for f, m in files.items())
        rank0, rank1 = hashed(log, "save", 0, name), hashed(log, "save", 1, name)
        assert rank0 | rank1 == set(files) and not rank0 & rank1
        assert {"dcp/.metadata", "state.json", "rng-0.safetensors", "dcp/__0_0.distcp"} <= rank0
        assert {"rng-1.safetensors", "dcp/__1_0.distcp"} <= rank1
        assert all("__1_" not in f and f != "rng-1.safetensors" for f in rank0)
        assert all("__0_" not in f and f != "rng-0.safetensors" for f in rank1)
        # the replicated whole tensors (optimizer step counts) sit apart from the ranks' shards
        assert any(f.startswith("dcp/__") and f.endswith("_1.distcp") for f in files)


def test_each_committed_save_is_an_event(saved):
    _, run, _ = saved
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    saves = [e for e in events if e["kind"] == "checkpoint"]
    assert [e["step"] for e in saves] == [5, 10]
    for e in saves:
        assert set(e) == {"kind", "step", "bytes", "seconds", "hash_seconds", "blocking_seconds"}
        files = json.loads((run / "checkpoints" / f"step-{e['step']:08d}" / "manifest.json").read_text())["files"]
        assert e["bytes"] == sum(f["bytes"] for f in files.values())
        assert 0 <= e["hash_seconds"] <= e["seconds"] and 0 < e["blocking_seconds"] <= e["seconds"]


def test_a_shard_only_rank_1_reads_is_found_by_rank_1_and_both_fall_back(saved):
    root, run, _ = saved
    copy = root / "runs" / "damaged"
    shutil.copytree(run, copy)
    flip_byte(copy / "checkpoints" / "step-00000010" / "dcp" / "__1_0.distcp")
    log = root / "log-damaged"
    proc = torchrun(["train", "--resume", str(copy), "--set", "train.steps=10"], log)
    warnings = [line for line in proc.stdout.splitlines() if "is unusable" in line]
    assert len(warnings) == 1  # one line, from rank 0, for both ranks
    assert "step-00000010 is unusable (dcp/__1_0.distcp does not match its checksum)" in warnings[0]
    assert f"resumed {copy} from step-00000005" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "dcp/__1_0.distcp" in hashed(log, "load", 1, "step-00000010")
    assert "dcp/__1_0.distcp" not in hashed(log, "load", 0, "step-00000010")  # rank 0 reads none of it
    assert "dcp/__0_0.distcp" not in hashed(log, "load", 1, "step-00000005")
    # Retrained from step 5 exactly as the run first did (the same layout repeated: bit for bit).
    # The asynchronous save's host copy was made while step 6's forward and backward ran, and the
    # update waited for it: had the copy seen step 6's update, step 6 would be trained twice.
    assert losses(copy) == losses(run)


def test_a_file_no_rank_reads_is_still_verified(saved):
    """An RNG state of a rank this world lacks (as after saving at a larger world size) is read
    by no rank; it is verified all the same, by rank 3 mod 2 = 1."""
    root, run, _ = saved
    copy = root / "runs" / "unread"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step-00000010"
    shutil.copy(newest / "rng-1.safetensors", newest / "rng-3.safetensors")
    manifest = json.loads((newest / "manifest.json").read_text())
    data = (newest / "rng-3.safetensors").read_bytes()
    manifest["files"]["rng-3.safetensors"] = {"xxh3_128": xxhash.xxh3_128(data).hexdigest(), "bytes": len(data)}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    flip_byte(newest / "rng-3.safetensors")
    log = root / "log-unread"
    proc = torchrun(["train", "--resume", str(copy), "--set", "train.steps=10"], log)
    assert "step-00000010 is unusable (rng-3.safetensors does not match its checksum)" in proc.stdout
    assert "rng-3.safetensors" in hashed(log, "load", 1, "step-00000010")
    assert "rng-3.safetensors" not in hashed(log, "load", 0, "step-00000010")
    assert f"resumed {copy} from step-00000005" in proc.stdout
