import json
import random

import numpy as np
import pytest
import torch
import xxhash

from kiln.config import OptimConfig, load_config
from kiln.errors import CheckpointError
from kiln.model.registry import build_model
from kiln.train import checkpoint as ckpt
from kiln.train.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    read_state,
    step_dir_name,
    verify_checkpoint,
)
from kiln.train.optim import build_optimizer


# The module offers either functions (save_checkpoint / load_checkpoint) or a Checkpointer class
# (the distributed-capable API); these adapters test whichever is present, single-process.
def save_checkpoint(folder, step, model, optimizer, trainer_state, keep=0):
    if hasattr(ckpt, "Checkpointer"):
        return ckpt.Checkpointer(folder, keep=keep).save(step, [model], [optimizer] if optimizer else [], trainer_state)
    return ckpt.save_checkpoint(folder, step, model, optimizer, trainer_state, keep=keep)


def load_checkpoint(path, model, optimizer):
    if hasattr(ckpt, "Checkpointer"):
        return ckpt.Checkpointer(path.parent).load(path, [model], [optimizer] if optimizer else None)
    return ckpt.load_checkpoint(path, model, optimizer)


def manifest_files(path):
    return json.loads((path / "manifest.json").read_text())["files"]


CFG = load_config(
    overrides=["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16", "model.dropout=0.1"]
).model


def fresh(impl="auto"):
    model = build_model(CFG, 300)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, implementation=impl), torch.device("cpu"))
    return model, opt


def train(model, opt, steps=3):
    for _ in range(steps):
        tokens = torch.randint(0, 300, (2, 17))
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def flip_byte(path, offset=-10):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_save_load_restores_everything_exactly(tmp_path, impl):
    torch.manual_seed(0)
    model, opt = fresh(impl)
    train(model, opt)
    np.random.seed(1)
    random.seed(2)
    path = save_checkpoint(tmp_path / "ckpt", 3, model, opt, {"note": "hi", "history": [1.5, 2.5]})
    assert path.name == step_dir_name(3) == "step-00000003"
    expect_torch = torch.rand(5)
    expect_np = np.random.rand(3)
    expect_py = random.random()
    # continue the original for two steps
    train(model, opt, 2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # scramble every generator
    np.random.seed(123)
    random.seed(123)
    model2, opt2 = fresh(impl)
    state = load_checkpoint(path, model2, opt2)
    assert state["step"] == 3 and state["trainer"] == {"note": "hi", "history": [1.5, 2.5]}
    assert torch.equal(torch.rand(5), expect_torch)
    assert np.array_equal(np.random.rand(3), expect_np)
    assert random.random() == expect_py

    # loading the same checkpoint again gives the same optimizer state as the original had at step 3
    model3, opt3 = fresh(impl)
    load_checkpoint(path, model3, opt3)
    s3 = opt3.state_dict()
    assert len(s3["state"]) == len(list(model3.parameters()))
    for st in s3["state"].values():
        assert set(st) >= {"step", "exp_avg", "exp_avg_sq"}
        assert float(st["step"]) == 3.0
    assert [g["lr"] for g in s3["param_groups"]] == [g["lr"] for g in opt.param_groups]
    assert tuple(s3["param_groups"][0]["betas"]) == opt.param_groups[0]["betas"]

    # continuing from the checkpoint reproduces the original run bit for bit
    load_checkpoint(path, model2, opt2)
    torch.rand(5)  # the draw the original made right after saving
    train(model2, opt2, 2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_model_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model, opt = fresh()
    train(model, opt, 1)
    path = save_checkpoint(tmp_path, 1, model, None, {})
    other, _ = fresh()
    load_checkpoint(path, other, None)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n


def test_manifest_lists_every_file_with_its_checksum(tmp_path):
    model, opt = fresh()
    train(model, opt, 1)
    path = save_checkpoint(tmp_path, 7, model, opt, {"x": 1})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"].startswith("kiln-checkpoint-")
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= set(files)
    assert any(f.startswith("rng") and f.endswith(".safetensors") for f in files)
    for name, meta in manifest["files"].items():
        data = (path / name).read_bytes()
        assert set(meta) == {"xxh3_128", "bytes"}
        assert meta["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
        assert meta["bytes"] == len(data)
    assert verify_checkpoint(path) is None
    assert read_state(path)["step"] == 7


@pytest.mark.parametrize("victim", ["model", "optimizer", "rng", "state"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, victim):
    model, opt = fresh()
    train(model, opt, 1)
    save_checkpoint(tmp_path, 2, model, opt, {})
    newest = save_checkpoint(tmp_path, 4, model, opt, {})
    victim = next(f for f in manifest_files(newest) if f.startswith(victim))
    flip_byte(newest / victim)
    assert verify_checkpoint(newest) == f"{victim} does not match its checksum"
    warnings = []
    assert latest_valid_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "step-00000002"
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and victim in warnings[0]


def test_missing_file_or_manifest(tmp_path):
    model, opt = fresh()
    a = save_checkpoint(tmp_path, 1, model, opt, {})
    b = save_checkpoint(tmp_path, 2, model, opt, {})
    rng_file = next(f for f in manifest_files(b) if f.startswith("rng"))
    (b / rng_file).unlink()
    assert verify_checkpoint(b) == f"{rng_file} is missing"
    (a / "manifest.json").unlink()
    assert verify_checkpoint(a) == "no manifest (incomplete write)"
    warnings = []
    assert latest_valid_checkpoint(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 2


def test_unreadable_or_foreign_manifest(tmp_path):
    model, opt = fresh()
    a = save_checkpoint(tmp_path, 1, model, opt, {})
    (a / "manifest.json").write_text("{truncated")
    assert verify_checkpoint(a) == "unreadable manifest"
    (a / "manifest.json").write_text(json.dumps({"format": "other", "files": {}}))
    assert "unknown format" in verify_checkpoint(a)


def test_leftover_tmp_folder_is_ignored(tmp_path):
    model, opt = fresh()
    good = save_checkpoint(tmp_path, 3, model, opt, {})
    (tmp_path / "step-00000009.tmp").mkdir()
    (tmp_path / "step-00000009.tmp" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "notes").mkdir()
    assert list_checkpoints(tmp_path) == [good]
    assert latest_valid_checkpoint(tmp_path, warn=pytest.fail) == good
    # a later save of that step replaces the stale temporary folder
    done = save_checkpoint(tmp_path, 9, model, opt, {})
    assert verify_checkpoint(done) is None and not (tmp_path / "step-00000009.tmp").exists()


def test_list_is_numeric_not_lexical(tmp_path):
    model, _ = fresh()
    for step in (900, 100000000, 5):  # 9 digits sorts after 8 digits numerically
        save_checkpoint(tmp_path, step, model, None, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000900", "step-100000000"]


def test_keep_retention(tmp_path):
    model, opt = fresh()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    save_checkpoint(tmp_path, 6, model, opt, {}, keep=0)  # 0 keeps everything
    assert len(list_checkpoints(tmp_path)) == 3
    assert list_checkpoints(tmp_path / "absent") == []


def test_resaving_a_step_replaces_it(tmp_path):
    model, opt = fresh()
    save_checkpoint(tmp_path, 2, model, opt, {"v": 1})
    path = save_checkpoint(tmp_path, 2, model, opt, {"v": 2})
    assert read_state(path)["trainer"] == {"v": 2} and verify_checkpoint(path) is None


def test_loading_into_a_different_model_is_refused(tmp_path):
    model, opt = fresh()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    other_cfg = load_config(
        overrides=["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.seq_len=16"]
    ).model
    other = build_model(other_cfg, 300)
    with pytest.raises(CheckpointError, match="model shape changed"):
        load_checkpoint(path, other, None)


@pytest.mark.parametrize("change", ["model.n_layers=1", "model.d_model=64"], ids=["fewer-layers", "wider"])
def test_loading_into_a_smaller_or_wider_model_is_refused(tmp_path, change):
    """A checkpoint whose tensors do not all fit the model is a user error (e.g. `--resume --set
    model.n_layers=...`): never a silent partial load, never a raw RuntimeError traceback."""
    base = {"model.n_layers": "2", "model.d_model": "32", "model.n_heads": "2", "model.seq_len": "16"}
    big = build_model(load_config(overrides=[f"{k}={v}" for k, v in base.items()]).model, 300)
    path = save_checkpoint(tmp_path, 1, big, None, {})
    key, value = change.split("=")
    target = build_model(load_config(overrides=[f"{k}={value if k == key else v}" for k, v in base.items()]).model, 300)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, target, None)


def test_cuda_rng_states_are_restored_in_device_order(monkeypatch):
    """cuda.N keys in numeric order: as strings, cuda.10 and cuda.11 sorted before cuda.2, and GPU 2
    got GPU 10's generator state."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    tensors = {"torch": torch.get_rng_state(), **{f"cuda.{i}": torch.tensor([i], dtype=torch.uint8) for i in range(12)}}
    ckpt.set_rng_state(tensors, ckpt.host_rng_state())  # the host generators: their current state
    assert [int(s) for s in restored] == list(range(12))


def test_each_checkpoint_file_is_hashed_by_the_rank_that_wrote_it():
    from kiln.train.checkpoint import file_owner

    assert file_owner("dcp/__1_0.distcp", 2) == 1 and file_owner("dcp/__0_3.distcp", 2) == 0
    assert file_owner("rng-1.safetensors", 2) == 1 and file_owner("rng-12.safetensors", 16) == 12
    assert file_owner("dcp/.metadata", 2) == 0 and file_owner("state.json", 2) == 0
    assert file_owner("model.safetensors", 1) == 0
    assert file_owner("rng-3.safetensors", 2) == 0  # written at another world size: rank 0 takes it
