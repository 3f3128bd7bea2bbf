"""The model section's family tables ([model.moe], [model.vision]): flat keys from before the
tables keep loading (run folders, files, --set, kiln fork --set), new runs write the tables, and
each "0 = default" is resolved by one property while the declared value is what is saved."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from kiln.config import ModelConfig, MoEConfig, flatten, from_dict, load_config, to_dict, to_toml
from kiln.errors import ConfigError

# config.toml files as runs wrote them before the family tables (flat `moe_*` and image keys)
LEGACY = Path(__file__).parent / "legacy_configs"


@pytest.mark.parametrize("name", ["moe-tiny", "vlm-tiny"])
def test_a_run_folder_written_before_the_tables_loads_as_it_did(name):
    flat = tomllib.loads((LEGACY / f"{name}.toml").read_text())
    cfg = from_dict(flat)
    got = {k: v for k, v in flatten(cfg).items() if k.startswith("model.")}
    want = {f"model.{k}": v for k, v in flat["model"].items()}
    assert {k: got[k] for k in want} == want
    added = set(got) - set(want)  # keys added since (model.parametrization, ...) take their defaults
    defaults = flatten(from_dict({}))
    assert {k: got[k] for k in added} == {k: defaults[k] for k in added}
    assert load_config(base=flat) == cfg  # as `--resume` and `kiln fork` read a run's config
    text = to_toml(cfg)  # a new run writes the tables
    assert "[model.moe]" in text and "[model.vision]" in text and "moe_experts" not in text
    assert from_dict(tomllib.loads(text)) == cfg


def test_the_legacy_moe_run_has_its_values_in_the_table():
    cfg = from_dict(tomllib.loads((LEGACY / "moe-tiny.toml").read_text()))
    assert (cfg.model.moe.experts, cfg.model.moe.d_ff, cfg.model.moe.bias_rate, cfg.model.moe.z_loss) == (
        8,
        192,
        0.01,
        0.001,
    )
    vlm = from_dict(tomllib.loads((LEGACY / "vlm-tiny.toml").read_text()))
    assert (vlm.model.vision.image_size, vlm.model.vision.patch_size, vlm.model.vision.n_patches) == (12, 3, 16)


def test_flat_and_table_spellings_are_one_key():
    flat = load_config("moe-tiny", overrides=["model.moe_bias_rate=0.02", "model.image_encoder_from=2024"])
    nested = load_config("moe-tiny", overrides=["model.moe.bias_rate=0.02", "model.vision.encoder_from=2024"])
    assert flat == nested and flat.model.moe.bias_rate == 0.02 and flat.model.vision.encoder_from == "2024"
    # a later layer wins whichever spelling either uses
    assert load_config(base={"model": {"moe_top_k": 1}}, overrides=["model.moe.top_k=3"]).model.moe.top_k == 3
    assert load_config(base={"model": {"moe": {"top_k": 3}}}, overrides=["model.moe_top_k=1"]).model.moe.top_k == 1


def test_family_table_mistakes_are_one_line():
    with pytest.raises(ConfigError, match="model.moe_top_k = 1 and model.moe.top_k = 2 set the same key"):
        from_dict({"model": {"moe_top_k": 1, "moe": {"top_k": 2}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model.moe.experz'; did you mean 'model.moe.experts'"):
        load_config(overrides=["model.moe.experz=4"])
    with pytest.raises(ConfigError, match=r"did you mean 'model.moe_experts'"):
        load_config(overrides=["model.moe_experz=4"])
    with pytest.raises(ConfigError, match=r"model.moe is a table \(\[model.moe\]\)"):
        from_dict({"model": {"moe": 3}})
    with pytest.raises(ConfigError, match="model.vision.channels must be an integer"):
        load_config(overrides=["model.vision.channels=grey"])


def test_python_construction_takes_flat_names_and_never_changes_a_shared_table():
    base = ModelConfig(moe_experts=4, moe_top_k=2)
    assert base.moe == MoEConfig(experts=4, top_k=2) and base.moe_experts == 4  # read through
    changed = dataclasses.replace(base, moe_top_k=1)
    assert changed.moe.top_k == 1 and base.moe.top_k == 2
    with pytest.raises(AttributeError):
        _ = base.moe_no_such_key


def test_defaults_are_resolved_by_one_property_and_saved_as_declared():
    cfg = load_config("tiny", overrides=["model.n_heads=4", "model.d_model=128"])
    assert cfg.model.n_kv_heads == 0 and cfg.model.kv_heads == 4
    assert to_dict(cfg)["model"]["n_kv_heads"] == 0  # what a run folder keeps
    fork = load_config(base=to_dict(cfg), overrides=["model.n_heads=8"])  # `kiln fork --set model.n_heads=8`
    assert fork.model.kv_heads == 8  # still multi-head, not silently grouped-query
    swiglu = ModelConfig(d_model=128, mlp="swiglu")
    assert (swiglu.ff_hidden, ModelConfig(d_model=128).ff_hidden, ModelConfig(d_ff=100).ff_hidden) == (384, 512, 100)
    assert (ModelConfig(seq_len=64).positions, ModelConfig(seq_len=64, max_seq_len=128).positions) == (64, 128)
    assert (ModelConfig(d_model=128, moe_d_ff=0).expert_hidden, ModelConfig(moe_d_ff=96).expert_hidden) == (384, 96)


def test_pipeline_stage_count_is_one_property():
    par = load_config(overrides=["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b"]).parallel
    assert (par.stages_per_rank, par.pipeline_stages) == (2, 4)
    par = load_config(overrides=["parallel.pp=2", "parallel.pp_stages_per_rank=3"]).parallel
    assert (par.stages_per_rank, par.pipeline_stages) == (1, 2)  # 1f1b: one stage per rank


def test_a_legacy_run_folder_forks_with_a_flat_set(tmp_path, monkeypatch):
    """`kiln fork --set model.moe_bias_rate=...` (the doctor's fix) of a run folder written
    before the tables: the fork's config.toml has the tables and the change."""
    from kiln.cli import main
    from kiln.runs.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    old = tmp_path / "runs" / "old"
    old.mkdir(parents=True)
    (old / "config.toml").write_text((LEGACY / "moe-tiny.toml").read_text())
    argv = ["fork", str(old), "--name", "new", "--from-scratch", "--no-train", "--set", "model.moe_bias_rate=0.02"]
    assert main(argv) == 0
    written = (tmp_path / "runs" / "new" / "config.toml").read_text()
    assert "[model.moe]" in written and "moe_bias_rate" not in written
    cfg = RunDir(tmp_path / "runs" / "new").config()
    assert cfg.model.moe.bias_rate == 0.02 and cfg.model.moe.z_loss == 0.001
