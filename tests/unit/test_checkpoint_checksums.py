"""Checkpoint checksums without reading everything twice (issue 34): files flushed and hashed as
they are written, the costs of each save, which rank verifies which file at a distributed load,
and the cheap check rank 0 makes before choosing a checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import xxhash

from kiln.config import OptimConfig, load_config
from kiln.fileio import FlushAndHash
from kiln.model.registry import build_model
from kiln.train.checkpoint import (
    Checkpointer,
    SaveStats,
    check_files,
    file_owner,
    latest_valid_checkpoint,
    verification_share,
    verify_checkpoint,
)
from kiln.train.optim import build_optimizer

CFG = load_config(overrides=["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16"]).model


def saved(folder: Path, step: int = 3) -> Path:
    model = build_model(CFG, 300)
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    model(torch.randint(0, 300, (2, 16))).sum().backward()
    opt.step()
    path = Checkpointer(folder).save(step, [model], [opt], {"x": 1})
    assert path is not None
    return path


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("algorithm", ["", "xxh3_128", "sha256"])
def test_flush_and_hash_gives_each_files_checksum(tmp_path, algorithm):
    paths = []
    for i, size in enumerate((0, 10, 5_000_000)):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    flushed = []
    with FlushAndHash(fsync=flushed.append, algorithm=algorithm) as files:
        for p in paths:
            files.add(p)
        assert paths[1] in files and tmp_path / "other" not in files
        digests, extra = files.finish()
    digest = hashlib.sha256 if algorithm == "sha256" else xxhash.xxh3_128  # xxh3 by default
    assert files.algorithm == (algorithm or "xxh3_128")
    assert digests == {p: digest(p.read_bytes()).hexdigest() for p in paths}
    assert sorted(flushed) == sorted(paths) and extra >= 0


def test_a_save_records_its_costs(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    model = build_model(CFG, 300)
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    path = checkpointer.save(7, [model], [opt], {})
    assert path is not None
    stats = checkpointer.last_save
    assert stats is not None and stats.step == 7
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert stats.bytes == sum(f["bytes"] for f in files.values())
    assert stats.blocking_seconds == stats.seconds >= stats.gather_seconds + stats.write_seconds
    assert 0 <= stats.hash_seconds <= stats.seconds
    event = stats.event()
    assert event == {
        "kind": "checkpoint",
        "step": 7,
        "bytes": stats.bytes,
        "seconds": round(stats.seconds, 3),
        "hash_seconds": round(stats.hash_seconds, 3),
        "blocking_seconds": round(stats.blocking_seconds, 3),
    }
    assert SaveStats(1).event()["bytes"] == 0


def test_every_file_is_verified_by_some_rank():
    names = ["state.json", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/__2_0.distcp"]
    names += ["dcp/__3_0.distcp", "rng-0.safetensors", "rng-1.safetensors", "rng-2.safetensors", "rng-3.safetensors"]
    # a 4-rank checkpoint loaded by 2 ranks: each reads two ranks' shards; nobody reads rng-2, rng-3
    reads = [
        {"state.json", "dcp/.metadata", "rng-0.safetensors", "dcp/__0_0.distcp", "dcp/__1_0.distcp"},
        {"state.json", "dcp/.metadata", "rng-1.safetensors", "dcp/__2_0.distcp", "dcp/__3_0.distcp"},
    ]
    shares = [verification_share(names, reads, rank) for rank in range(2)]
    assert shares[0] == reads[0] | {"rng-2.safetensors"}
    assert shares[1] == reads[1] | {"rng-3.safetensors"}
    assert set().union(*shares) == set(names)


def test_file_owner_counts_every_file_of_a_rank():
    assert file_owner("dcp/__1_0.distcp", 2) == file_owner("dcp/__1_1.distcp", 2) == 1
    assert file_owner("rng-1.safetensors", 2) == 1 and file_owner("dcp/.metadata", 2) == 0
    assert file_owner("dcp/__3_0.distcp", 2) == 0  # a file of a rank this world lacks: rank 0's


def test_check_files_sizes_then_checksums(tmp_path):
    path = saved(tmp_path)
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert check_files(path, files, sorted(files)) is None
    assert check_files(path, files, ["nothing.bin"]) == "nothing.bin is not in the manifest"
    flip_byte(path / "optimizer.safetensors")
    assert check_files(path, files, ["model.safetensors"]) is None  # only what is asked for is read
    assert check_files(path, files, ["optimizer.safetensors"]) == "optimizer.safetensors does not match its checksum"
    assert check_files(path, files, ["optimizer.safetensors"], hashed=False) is None
    (path / "model.safetensors").write_bytes(b"short")
    assert check_files(path, files, ["model.safetensors"], hashed=False) == (
        "model.safetensors does not match its checksum"
    )


def test_a_checkpoint_with_sha256_checksums_still_verifies_and_loads(tmp_path):
    """Checkpoints made before xxh3 (format 2, every entry a sha256) are still read: verified by
    sha256, a flipped byte still found; an entry with no known checksum is an unreadable manifest."""
    path = saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "kiln-checkpoint-3"
    old = {
        name: {"sha256": hashlib.sha256((path / name).read_bytes()).hexdigest(), "bytes": meta["bytes"]}
        for name, meta in manifest["files"].items()
    }
    (path / "manifest.json").write_text(json.dumps({"format": "kiln-checkpoint-2", "files": old}))
    assert verify_checkpoint(path) is None
    model = build_model(CFG, 300)
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    assert Checkpointer(tmp_path).load(path, [model], [opt])["trainer"] == {"x": 1}
    flip_byte(path / "model.safetensors")
    assert verify_checkpoint(path) == "model.safetensors does not match its checksum"
    files = {name: {"crc": "0", "bytes": meta["bytes"]} for name, meta in old.items()}
    assert check_files(path, files, ["state.json"]).startswith("unreadable manifest: no known checksum")


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "state"])
def test_choosing_a_checkpoint_without_reading_it_all(tmp_path, damage):
    """What rank 0 checks before choosing, under several ranks: the manifest, every file's size,
    state.json's checksum; a flipped byte in a data file is left to the loading ranks."""
    older, newest = saved(tmp_path, 2), saved(tmp_path, 4)
    victim = newest / ("state.json" if damage == "state" else "model.safetensors")
    if damage in ("flip", "state"):
        flip_byte(victim)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.unlink()
    assert verify_checkpoint(newest) is not None  # a full check finds every kind of damage
    shallow = verify_checkpoint(newest, deep=False)
    assert (shallow is None) == (damage == "flip")
    warned = []
    chosen = latest_valid_checkpoint(tmp_path, warn=warned.append, deep=False)
    assert chosen == (newest if damage == "flip" else older)
    assert len(warned) == (damage != "flip")


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    """kiln.fileio's one mechanism for atomic files (runs, plots, caches, exports): a block that
    fails leaves the old content and no temporary file; one that ends replaces it whole."""
    import pytest as _pytest

    from kiln.fileio import atomic_path, write_atomic

    target = tmp_path / "deep" / "file.json"
    write_atomic(target, "old")
    with _pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["file.json"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["file.json"]
