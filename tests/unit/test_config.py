import dataclasses
import tomllib

import pytest

from kiln.config import Config, from_dict, load_config, parse_override, preset_names, to_dict, to_toml
from kiln.errors import ConfigError
from kiln.train.resolve import check_training


def checked(overrides):
    """A config checked as training checks it (family rules included)."""
    cfg = load_config(overrides=overrides)
    check_training(cfg)
    return cfg


@pytest.mark.parametrize("name", sorted({"tiny", "gpt2-124m", "llama-1b", *preset_names()}))
def test_presets_load_and_validate(name):
    assert name in preset_names()
    cfg = load_config(preset=name)
    assert isinstance(cfg, Config)


def test_preset_values_are_applied():
    gpt2 = load_config(preset="gpt2-124m")
    assert (gpt2.model.n_layers, gpt2.model.d_model, gpt2.model.seq_len) == (12, 768, 1024)
    assert gpt2.global_batch == 524288 // 1024 == 512
    llama = load_config(preset="llama-1b")
    assert (llama.model.n_kv_heads, llama.model.pos, llama.model.mlp, llama.schedule.name) == (
        8,
        "rope",
        "swiglu",
        "wsd",
    )
    tiny = load_config(preset="tiny")
    assert tiny.data.corpus == "stdlib" and tiny.model.pos == "rope" and tiny.train.steps > 0


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        load_config(preset="nope")


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("train.steps=200", "train.steps", 200),
        ("optim.lr=3e-4", "optim.lr", 3e-4),
        ("model.bias=false", "model.bias", False),
        ("model.pos=rope", "model.pos", "rope"),
        ('model.pos="rope"', "model.pos", "rope"),
        ("data.corpus=some/dir/*.txt", "data.corpus", "some/dir/*.txt"),
        ('eval.prompts=["a", "b c"]', "eval.prompts", ["a", "b c"]),
        (" train.seed = 7 ", "train.seed", 7),
    ],
)
def test_parse_override(item, key, value):
    k, v = parse_override(item)
    assert (k, v) == (key, value)
    assert type(v) is type(value)


@pytest.mark.parametrize("item", ["train.steps", "steps=3", "a.b.c.d=1", "a..b=1"])
def test_parse_override_malformed(item):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(item)


def test_overrides_of_every_type_reach_the_config():
    cfg = load_config(
        preset="tiny",
        overrides=[
            "train.steps=17",
            "optim.lr=0.004",
            "optim.weight_decay=0",
            "model.qk_norm=true",
            "model.norm=layernorm",
            'eval.prompts=["x", "y"]',
            "eval.prompts=[]",
            "train.compile=False",
        ],
    )
    assert cfg.train.steps == 17
    assert cfg.optim.lr == 0.004
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.model.qk_norm is True
    assert cfg.model.norm == "layernorm"
    assert cfg.eval.prompts == []
    assert cfg.train.compile is False


def test_int_is_accepted_for_float_and_a_string_becomes_a_list():
    cfg = load_config(overrides=["optim.lr=1", "eval.prompts=hello"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.eval.prompts == ["hello"]


def test_later_overrides_win():
    cfg = load_config(preset="tiny", overrides=["train.steps=5", "train.steps=9"])
    assert cfg.train.steps == 9


def test_config_file_between_preset_and_overrides(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text("[train]\nsteps = 42\nseed = 3\n[model]\nd_model = 128\n")
    cfg = load_config(preset="tiny", config_file=f, overrides=["train.seed=5"])
    assert (cfg.train.steps, cfg.train.seed, cfg.model.d_model, cfg.model.n_layers) == (42, 5, 128, 2)


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(config_file=bad)


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.stpes=10"])
    msg = str(e.value)
    assert "train.stpes" in msg and "did you mean 'train.steps'" in msg
    assert "\n" not in msg


def test_unknown_section_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["trian.steps=10"])
    assert "'trian'" in str(e.value) and "did you mean 'train'" in str(e.value)


def test_unknown_key_without_close_match_lists_allowed():
    with pytest.raises(ConfigError, match=r"unknown config key 'log\.zzzzzz'; allowed: log\.every, log\.plot"):
        load_config(overrides=["log.zzzzzz=1"])


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("train.steps=ten", r"train\.steps must be an integer, got 'ten'"),
        ("train.steps=1.5", r"train\.steps must be an integer"),
        ("train.steps=true", r"train\.steps must be an integer"),
        ("optim.lr=fast", r"optim\.lr must be a number"),
        ("model.bias=maybe", r"model\.bias must be true or false"),
        ("model.pos=3", r"model\.pos = '3' is not allowed; choose one of learned, rope"),
        ("eval.prompts=[1, 2]", r"eval\.prompts must be a string"),
        ("model.pos=alibi", r"model\.pos = 'alibi' is not allowed; choose one of learned, rope"),
        ("train.steps=-1", r"train\.steps must be >= 0"),
        ("model.n_layers=0", r"model\.n_layers must be positive"),
        ("model.dropout=1.0", r"model\.dropout must be in \[0, 1\)"),
        ("data.vocab_size=100", r"data\.vocab_size = 100 is too small"),
        ("data.val_fraction=0", r"data\.val_fraction"),
        ("train.batch_tokens=100", r"train\.batch_tokens = 100 must be a multiple of model\.seq_len = 256"),
        ("train.micro_batch_size=5", r"train\.micro_batch_size = 5 must divide the global batch of 16"),
    ],
)
def test_wrong_values(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(preset="tiny", overrides=[item])


def test_section_must_be_a_table():
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        from_dict({"train": 3})


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match=r"model\.n_heads = 5 must divide model\.d_model = 64"):
        checked(["model.d_model=64", "model.n_heads=5"])


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads = 3 must divide model\.n_heads = 4"):
        checked(["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"n_kv_heads = 8 must divide model\.n_heads = 4"):
        checked(["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=8"])
    assert checked(["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2"]).model.n_kv_heads == 2


def test_rope_needs_even_head_size():
    with pytest.raises(ConfigError, match="even head size"):
        checked(["model.pos=rope", "model.d_model=36", "model.n_heads=4"])


def test_seq_len_longer_than_learned_position_table():
    with pytest.raises(ConfigError, match=r"model\.seq_len = 512 is longer than .*max_seq_len = 256"):
        load_config(overrides=["model.pos=learned", "model.seq_len=512", "model.max_seq_len=256"])
    # max_seq_len = 0 means "= seq_len", and a longer table is fine
    assert load_config(overrides=["model.pos=learned", "model.seq_len=512"]).model.max_seq_len == 0
    assert load_config(overrides=["model.pos=learned", "model.seq_len=128", "model.max_seq_len=256"])


def test_objective_family_mismatch():
    with pytest.raises(ConfigError, match="train.objective = 'masked' needs model.family = 'encoder'"):
        checked(["train.objective=masked"])
    with pytest.raises(ConfigError, match="train.objective = 'causal' needs model.family = 'decoder'"):
        checked(["model.family=encoder"])


def test_names_are_resolved_after_plugins_not_by_the_config_layer():
    """The config layer accepts any family, objective, suite or callback name; `kiln.train.resolve`
    checks them against the registries (which plugins fill)."""
    cfg = load_config(
        overrides=["model.family=not-yet-registered", 'eval.suites=["mine"]', 'callbacks.enabled=["my_monitor"]']
    )
    with pytest.raises(ConfigError, match="model.family = 'not-yet-registered' is not a registered model family"):
        check_training(cfg)
    with pytest.raises(ConfigError, match="unknown suite 'mine'"):
        check_training(load_config(overrides=['eval.suites=["mine"]']))
    with pytest.raises(ConfigError, match="unknown callback 'my_monitor'"):
        check_training(load_config(overrides=['callbacks.enabled=["my_monitor"]']))
    with pytest.raises(ConfigError, match="train.objective = 'nope' is not a registered objective"):
        check_training(load_config(overrides=["train.objective=nope"]))


def test_callback_options_nest_and_round_trip():
    cfg = load_config(
        overrides=[
            'callbacks.enabled=["layer_stats"]',
            "callbacks.layer_stats.every=5",
            "callbacks.layer_stats.modules=layers.0.attn",
        ]
    )
    assert cfg.callbacks.enabled == ["layer_stats"]
    assert cfg.callbacks.options == {"layer_stats": {"every": 5, "modules": "layers.0.attn"}}
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
    assert "[callbacks.layer_stats]" in to_toml(cfg)
    check_training(cfg)  # the option types are the callback's: a string becomes a one-item list there
    with pytest.raises(ConfigError, match=r"callbacks\.layer_stats\.every must be an integer"):
        check_training(load_config(overrides=['callbacks.enabled=["layer_stats"]', "callbacks.layer_stats.every=x"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'callbacks\.layer_stats\.evry'; did you mean"):
        check_training(load_config(overrides=["callbacks.layer_stats.evry=3"]))
    with pytest.raises(ConfigError, match="train.steps must be a value, not a table"):
        load_config(overrides=["train.steps.x=1"])


def test_tokens_and_batch_tokens_derive_steps():
    cfg = load_config(overrides=["model.seq_len=64", "train.batch_tokens=512", "train.tokens=5000"])
    assert cfg.global_batch == 8
    assert cfg.total_steps == 10  # ceil(5000 / 512)


@pytest.mark.parametrize("name", sorted({"tiny", "gpt2-124m", "llama-1b", *preset_names()}))
def test_to_toml_round_trips(name):
    cfg = load_config(
        preset=name,
        overrides=[
            'eval.prompts=["quote \\" and backslash \\\\", "tab\\there", "new\\nline"]',
            "optim.eps=1e-12",
            "data.corpus=a dir/with spaces/*.jsonl",
        ],
    )
    text = to_toml(cfg)
    parsed = tomllib.loads(text)
    assert parsed == to_dict(cfg)
    again = from_dict(parsed)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_to_toml_round_trips_control_characters():
    """A prompt with a carriage return (e.g. a Windows line ending) must survive config.toml."""
    cfg = load_config(overrides=['eval.prompts=["line\\r\\n", "bell\\u0007"]'])
    assert cfg.eval.prompts == ["line\r\n", "bell\x07"]
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_rope_position_table_shorter_than_seq_len_is_rejected_or_works():
    """model.max_seq_len sizes the RoPE tables too; a config that validates must also run."""
    import torch

    from kiln.model.registry import build_model

    try:
        cfg = load_config(
            overrides=[
                "model.pos=rope",
                "model.seq_len=64",
                "model.max_seq_len=32",
                "model.d_model=64",
                "model.n_heads=4",
                "model.n_layers=1",
            ]
        )
    except ConfigError as e:
        assert "max_seq_len" in str(e)
        return
    from conftest import init_model

    model = init_model(build_model(cfg.model, 300), cfg.model)
    assert model(torch.zeros(1, 64, dtype=torch.long)).shape[:2] == (1, 64)


def test_every_registered_family_and_objective_can_be_built():
    """The choices come from the registries: every registered family builds, every objective resolves."""
    from kiln.model.registry import MODEL_SPECS, build_model
    from kiln.objectives import OBJECTIVES

    assert {"decoder", "encoder"} <= set(MODEL_SPECS) and {"causal", "masked"} <= set(OBJECTIVES)
    for family, spec in MODEL_SPECS.items():
        objective = "multimodal" if family == "vlm" else "causal" if spec.causal else "masked"
        extra = ["model.moe_experts=4", "model.mlp=swiglu", "model.bias=false"] if family == "moe" else []
        cfg = load_config(
            overrides=[
                f"model.family={family}",
                f"train.objective={objective}",
                "model.d_model=64",
                "model.n_layers=1",
                *extra,
            ]
        )
        check_training(cfg)
        assert build_model(cfg.model, 300) is not None
