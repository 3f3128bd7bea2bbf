"""Hugging Face round trips, checked against `transformers` itself (tolerances fixed, never relaxed).

Models are small and random (every weight, norm gains and biases included, drawn away from
their initial values so a swapped or untransposed tensor shows), built locally: nothing is
downloaded. Configurations are chosen to catch mapping mistakes: grouped-query attention,
untied embeddings, a vocabulary and an intermediate size that are not multiples of 64, a
non-default rope_theta and norm epsilon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kiln.config import ModelConfig, load_config  # noqa: E402
from kiln.data.tokenizer import train_tokenizer  # noqa: E402
from kiln.interop import hf, hf_files  # noqa: E402
from kiln.interop.convert import LanguageModel, adapter_for, generation_config, load, read_hf  # noqa: E402
from kiln.model.registry import build_model  # noqa: E402

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n",
    "for i in range(10):\n    print(i)\n",
    "import os\nprint(os.getcwd())\n",
    "while True:\n    break\n",
] * 40
TOL = {"llama": 1e-5, "qwen3": 1e-5, "gpt2": 1e-4, "bert": 1e-4}

LLAMA = ModelConfig(
    family="decoder",
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_model=64,
    d_ff=136,
    seq_len=32,
    pos="rope",
    rope_theta=50000.0,
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
)
QWEN3 = replace(LLAMA, qk_norm=True)
GPT2 = ModelConfig(
    family="decoder",
    n_layers=2,
    n_heads=4,
    d_model=64,
    d_ff=200,
    seq_len=32,
    pos="learned",
    norm="layernorm",
    norm_eps=1e-4,
    mlp="gelu",
    bias=True,
    tie_embeddings=False,
)
BERT = ModelConfig(
    family="encoder",
    n_layers=2,
    n_heads=4,
    d_model=64,
    d_ff=136,
    seq_len=32,
    pos="learned",
    norm="layernorm",
    norm_eps=1e-7,
    mlp="gelu_exact",
    bias=True,
    tie_embeddings=True,
    norm_position="post",
    embed_norm=True,
    type_vocab_size=2,
)
FLAVOURS = {
    "llama": LLAMA,
    "qwen3": QWEN3,
    "gpt2": GPT2,
    "llama-tied": replace(LLAMA, tie_embeddings=True),
    "llama-bias": replace(LLAMA, bias=True),
    "gpt2-tied": replace(GPT2, tie_embeddings=True),
    "gpt2-exact-gelu": replace(GPT2, mlp="gelu_exact"),
    "bert": BERT,
    # µP at 4x its base width: the output multiplier folds into the final norm (tied or not), the
    # attention scale's ratio into the query projection (its bias too), or the query norm's gain
    "llama-mup": replace(LLAMA, parametrization="mup", mup_base_width=16),
    "llama-tied-mup": replace(LLAMA, tie_embeddings=True, parametrization="mup", mup_base_width=16),
    "qwen3-mup": replace(QWEN3, parametrization="mup", mup_base_width=16),
    "gpt2-mup": replace(GPT2, parametrization="mup", mup_base_width=16),
}


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(iter(TEXT), vocab_size=301)
    assert tok.vocab_size % 64 != 0  # the padding is exercised
    return tok


def random_model(cfg: ModelConfig, vocab: int, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg, vocab)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norm gains around 1, everything else around 0
            base = (
                1.0
                if p.dim() == 1 and not any(n.endswith("bias") for n, q in model.named_parameters() if q is p)
                else 0.0
            )
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    model.init_buffers()
    return model.eval()


def export_folder(model, cfg: ModelConfig, tokenizer, out: Path) -> Path:
    adapter = adapter_for(cfg)
    tensors = adapter.to_hf(cfg, {k: v.detach() for k, v in model.state_dict().items()}, tokenizer.vocab_size)
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    files = {
        "config.json": adapter.config(cfg, tokenizer.vocab_size, ids),
        "generation_config.json": generation_config(tokenizer),
    }
    return hf_files.write_folder(out, files, tensors, tokenizer, cfg.max_seq_len or cfg.seq_len, 10**9)


def hf_model(folder: Path):
    auto = (
        transformers.AutoModelForMaskedLM
        if json.loads((folder / "config.json").read_text())["model_type"] == "bert"
        else transformers.AutoModelForCausalLM
    )
    return auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def batch(tokenizer, rows: int = 3, length: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, tokenizer.vocab_size, (rows, length), generator=gen)


def assert_greedy_agrees(model: LanguageModel, theirs, prompt: torch.Tensor, greedy: torch.Tensor, tol: float) -> None:
    """Kiln's greedy continuation of `prompt` is transformers' (`greedy`) up to a near-tie. The two
    implementations add in other orders, so their logits agree to `tol`, not bit for bit (which kernels
    run depends on the CPU): where the token Kiln picked scores within 2 * tol of transformers' best,
    either is a correct greedy choice and the continuations may part there. Anywhere else (a mapping,
    context or padding-row bug) a different token fails."""
    ours = model.generate(prompt, greedy.shape[1] - prompt.shape[1])
    assert ours.shape == greedy.shape
    parted = (ours[0] != greedy[0]).nonzero()
    if len(parted) == 0:
        return
    i = int(parted[0])
    with torch.no_grad():
        mine, reference = model(greedy[:, :i])[0, -1], theirs(greedy[:, :i]).logits[0, -1]
    assert (mine - reference).abs().max().item() <= tol  # the common prefix scores alike ...
    for who, token in (("Kiln", ours[0, i]), ("transformers", greedy[0, i])):  # ... and both picks nearly tie
        gap = (reference.max() - reference[token]).item()
        assert gap <= 2 * tol, f"position {i}: {who} picked {int(token)}, {gap:.2e} below the best logit"


@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_exported_logits_match_transformers(tmp_path, tokenizer, name):
    cfg = FLAVOURS[name]
    model = random_model(cfg, tokenizer.vocab_size)
    folder = export_folder(model, cfg, tokenizer, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM" if name == "bert" else hf.HF_CLASSES[hf.hf_flavour(cfg)]]
    theirs = hf_model(folder)
    assert type(theirs).__name__ == config["architectures"][0]
    ids = batch(tokenizer)
    with torch.no_grad():
        ours = LanguageModel(model, tokenizer.vocab_size, cfg)(ids)
        reference = theirs(ids).logits
    assert ours.shape == reference.shape == (*ids.shape, tokenizer.vocab_size)
    diff = (ours - reference).abs().max().item()
    assert diff <= TOL[name.split("-")[0]], f"{name}: max |logit difference| {diff:.2e}"
    if name == "bert":
        return  # a masked LM does not generate
    prompt = ids[:1, :4]
    with torch.no_grad():
        greedy = theirs.generate(
            prompt,
            max_new_tokens=20,
            do_sample=False,
            use_cache=False,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=None,
        )
    assert_greedy_agrees(
        LanguageModel(model, tokenizer.vocab_size, cfg), theirs, prompt, greedy, TOL[name.split("-")[0]]
    )


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "gpt2-tied", "bert"])
def test_import_then_export_is_bit_identical(tmp_path, tokenizer, name):
    cfg = FLAVOURS[name]
    adapter = adapter_for(cfg)
    folder = export_folder(random_model(cfg, tokenizer.vocab_size, seed=3), cfg, tokenizer, tmp_path / "a")
    original = hf_files.read_weights(folder)
    imported_cfg, tok, state = read_hf(folder)
    assert imported_cfg == replace(cfg, max_seq_len=cfg.max_seq_len or cfg.seq_len)  # the options survive
    again = adapter.to_hf(imported_cfg, state, tok.vocab_size)
    assert sorted(again) == sorted(original)
    for key in original:
        assert torch.equal(again[key], original[key]), key
    # and Kiln -> HF -> Kiln gives Kiln's own tensors back (true vocabulary rows)
    model = random_model(cfg, tokenizer.vocab_size, seed=4)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    back = adapter.from_hf(cfg, adapter.to_hf(cfg, state, tokenizer.vocab_size))
    for key, value in state.items():
        expected = value[: tokenizer.vocab_size] if key in hf.VOCAB_TENSORS else value
        assert torch.equal(back[key], expected), key


def save_causal_tokenizer(tokenizer, folder: Path) -> None:
    """Kiln's tokenizer as `transformers` saves a causal model's (bos, eos, pad and unk roles)."""
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.tok,
        eos_token="<|eos|>",
        bos_token="<|bos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
    ).save_pretrained(folder)


def saved_transformers_model(cls, config, folder: Path):
    """A model `transformers` builds and saves itself, its weights moved off their initial values."""
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def test_a_real_transformers_model_imports_with_parity(tmp_path, tokenizer):
    """The other direction from the start: a model `transformers` built and saved itself."""
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=136,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_id,
    )
    theirs = saved_transformers_model(transformers.LlamaForCausalLM, config, tmp_path / "llama")
    save_causal_tokenizer(tokenizer, tmp_path / "llama")
    model, tok = load(tmp_path / "llama")
    ids = batch(tok)
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"


def endoftext_tokenizer():
    """A GPT-2-style tokenizer: byte-level BPE whose only special token is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(
        TEXT,
        trainers.BpeTrainer(
            vocab_size=290, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    return tok, fast


def test_a_real_bert_imports_with_parity_and_its_cls_sep_roles(tmp_path, tokenizer):
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=136,
        max_position_embeddings=64,
        layer_norm_eps=1e-7,
        pad_token_id=tokenizer.pad_id,
    )
    theirs = saved_transformers_model(transformers.BertForMaskedLM, config, tmp_path / "bert")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.tok,
        cls_token="<|bos|>",
        sep_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        mask_token="<|mask|>",
    ).save_pretrained(tmp_path / "bert")
    model, tok = load(tmp_path / "bert")
    assert (tok.bos_id, tok.eos_id, tok.mask_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id)
    ids = batch(tok)
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_the_bert_base_preset_is_bert_base_exactly():
    """Every tensor of the preset's model has BertForMaskedLM's name and shape, and no more."""
    cfg = load_config("bert-base").model
    with torch.device("meta"):
        ours = build_model(cfg, 30522)
        theirs = transformers.BertForMaskedLM(
            transformers.BertConfig(
                **{k: v for k, v in adapter_for(cfg).config(cfg, 30522, {}).items() if k != "torch_dtype"}
            )
        )
    mapped = adapter_for(cfg).to_hf(cfg, dict(ours.state_dict()), 30522)
    expected = {
        k: tuple(v.shape)
        for k, v in theirs.state_dict().items()
        if k not in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    }
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected


def test_gpt2_endoftext_tokenizer_maps_every_role(tmp_path):
    """GPT-2's tokenizer names one special token: it becomes bos, eos, pad and unk; no mask."""
    tok, fast = endoftext_tokenizer()
    fast.save_pretrained(tmp_path)
    kt = hf_files.read_tokenizer(tmp_path, {"eos_token_id": tok.token_to_id("<|endoftext|>")})
    eot = tok.token_to_id("<|endoftext|>")
    assert (kt.bos_id, kt.eos_id, kt.pad_id, kt.unk_id, kt.mask_id) == (eot, eot, eot, eot, None)
    assert kt.custom_roles


def test_roles_named_in_either_file_are_found(tmp_path, tokenizer):
    """special_tokens_map.json may name some roles and tokenizer_config.json others."""
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_json())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eos|>"}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"mask_token": {"content": "<|mask|>"}, "pad_token": "<|pad|>"})
    )
    kt = hf_files.read_tokenizer(tmp_path, {})
    assert (kt.eos_id, kt.mask_id, kt.pad_id, kt.bos_id) == (
        tokenizer.eos_id,
        tokenizer.mask_id,
        tokenizer.pad_id,
        tokenizer.eos_id,
    )


@pytest.mark.parametrize(
    "cfg, words",
    [
        (replace(LLAMA, norm="layernorm"), "model.norm = 'layernorm'"),
        (replace(LLAMA, mlp="gelu"), "model.mlp = 'gelu'"),
        (replace(QWEN3, bias=True), "model.bias = true"),
        (replace(LLAMA, post_norm=True), "model.post_norm"),
        (replace(GPT2, pos="learned", norm="rmsnorm"), "model.norm = 'rmsnorm'"),
        (replace(GPT2, mlp="swiglu"), "model.mlp = 'swiglu'"),
        (replace(GPT2, n_kv_heads=2), "grouped-query"),
        (replace(GPT2, qk_norm=True), "model.qk_norm"),
        (replace(GPT2, bias=False), "model.bias = false"),
        (replace(LLAMA, family="encoder"), "model.family = 'encoder'"),
        (replace(BERT, norm_position="pre"), "model.norm_position = 'pre'.*the bert flavour"),
        (replace(BERT, mlp="gelu"), "model.mlp = 'gelu'.*BertForMaskedLM"),
        (replace(BERT, pos="rope"), "model.pos = 'rope'"),
        (replace(BERT, type_vocab_size=0), "model.type_vocab_size = 0"),
    ],
)
def test_inexpressible_models_are_refused_naming_the_option(cfg, words):
    from kiln.errors import ConfigError

    flavour = adapter_for(cfg).flavour if cfg.family == "encoder" and "family" not in words else hf.hf_flavour
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        flavour(cfg)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"head_dim": 32}, "head_dim = 32"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias = True with mlp_bias = False"),
        ({"model_type": "mistral"}, "model_type = 'mistral'"),
    ],
)
def test_imports_kiln_cannot_express_are_refused(change, words):
    from kiln.errors import ConfigError

    config = {**hf.hf_config(LLAMA, 301, {}), **change}
    config.pop("rope_parameters") if "rope_scaling" in change else None
    with pytest.raises(ConfigError, match=words):
        hf.kiln_model_config(config)


def test_shards_and_index_above_the_size_limit(tmp_path, tokenizer):
    cfg = LLAMA
    model = random_model(cfg, tokenizer.vocab_size)
    tensors = hf.to_hf(cfg, {k: v.detach() for k, v in model.state_dict().items()}, tokenizer.vocab_size)
    files = hf_files.write_weights(tmp_path, tensors, max_bytes=40_000)
    assert len(files) > 2 and (tmp_path / hf_files.INDEX).is_file()
    index = json.loads((tmp_path / hf_files.INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    back = hf_files.read_weights(tmp_path)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


# ----------------------------------------------------------------------------- whole runs, the CLI
def kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`kiln ARGS` in `cwd`: training in a process of its own, export and import in this one (they
    go through the same `main`, and a fresh interpreter would cost seconds of imports each)."""
    if args[0] in ("export", "import", "sample", "eval"):
        import contextlib
        import io

        from kiln.cli import main

        out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
        try:
            os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
        finally:
            os.chdir(here)
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    env = dict(os.environ, KILN_QUIET="1")
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


TINY_RUN = [
    "--set",
    "model.n_layers=2",
    "--set",
    "model.d_model=64",
    "--set",
    "model.n_heads=4",
    "--set",
    "model.seq_len=32",
    "--set",
    "data.vocab_size=300",
    "--set",
    "train.steps=12",
    "--set",
    "train.time_budget_s=0",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.precision=fp32",
    "--set",
    "eval.every=0",
    "--set",
    "eval.batches=1",
    "--set",
    "log.plot=false",
    "--set",
    "checkpoint.every=12",
    "--set",
    "guard.hang_min_s=0",
    "--set",
    "eval.sample_tokens=4",
    "--set",
    "data.piece_chars=400",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfrun")
    (root / "corpus.txt").write_text("".join(TEXT))
    r = kiln(
        "train",
        "--preset",
        "tiny",
        "--name",
        "base",
        "--set",
        f"data.corpus={root / 'corpus.txt'}",
        "--set",
        f"data.cache_dir={root / 'cache'}",
        *TINY_RUN,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def test_cli_export_loads_in_a_text_generation_pipeline(trained):
    out = trained / "export-hf"
    r = kiln("export", "runs/base", "--format", "hf", "--out", str(out), cwd=trained)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= names
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.pad_token, tok.mask_token, tok.model_max_length) == (
        "<|eos|>",
        "<|pad|>",
        "<|mask|>",
        32,
    )
    assert tok.clean_up_tokenization_spaces is False
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=tok, device="cpu")
    text = pipe("def ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("def ") and len(text) > 4
    model, ktok = load(trained / "runs" / "base")  # the Python API on the run and on its export agree
    exported, _ = load(out)
    ids = torch.tensor([ktok.encode("def add(a, b):")])
    assert torch.equal(model(ids), exported(ids))


def test_a_trained_bert_flavour_run_exports_to_bert_for_masked_lm(trained, tmp_path):
    bert = [
        "--set",
        "model.family=encoder",
        "--set",
        "train.objective=masked",
        "--set",
        "model.pos=learned",
        "--set",
        "model.norm=layernorm",
        "--set",
        "model.mlp=gelu_exact",
        "--set",
        "model.bias=true",
        "--set",
        "model.norm_position=post",
        "--set",
        "model.embed_norm=true",
        "--set",
        "model.type_vocab_size=2",
    ]
    r = kiln(
        "train",
        "--preset",
        "tiny",
        "--name",
        "bert",
        "--set",
        f"data.corpus={trained / 'corpus.txt'}",
        "--set",
        f"data.cache_dir={trained / 'cache'}",
        *TINY_RUN,
        *bert,
        cwd=trained,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = kiln("export", "runs/bert", "--format", "hf", "--out", str(tmp_path / "bert"), cwd=trained)
    assert r.returncode == 0, r.stderr
    theirs = hf_model(tmp_path / "bert")
    assert type(theirs).__name__ == "BertForMaskedLM"
    model, tok = load(trained / "runs" / "bert")
    ids = torch.tensor([tok.encode("def add(a, b):")])
    ids[0, 2] = tok.mask_id
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


def test_refused_export_exits_2_and_writes_nothing(trained):
    r = kiln("export", "runs/base", "--format", "hf", "--out", "x", "--max-shard-size", "lots", cwd=trained)
    assert r.returncode == 2 and "max-shard-size" in r.stderr and "Traceback" not in r.stderr
    assert not (trained / "x").exists()
    r = (
        kiln("export", "runs/base", "--format", "hf", "--out", "export-hf", cwd=trained)
        if (trained / "export-hf").exists()
        else None
    )
    if r is not None:
        assert r.returncode == 2 and "already exists" in r.stderr


def test_a_model_without_a_hf_class_is_refused_in_one_line(trained, tmp_path):
    import shutil

    run = tmp_path / "layernorm-rope"
    shutil.copytree(trained / "runs" / "base", run)
    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(config.replace('norm = "rmsnorm"', 'norm = "layernorm"', 1))
    r = kiln("export", str(run), "--format", "hf", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "model.norm = 'layernorm'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_imported_gpt2_continues_pretraining_and_its_loss_falls(tmp_path):
    """A GPT-2-shaped transformers model with a GPT-2-style tokenizer (one special token), imported,
    trains 20 steps on a new corpus: the roles travel through data preparation and training."""
    tok, fast = endoftext_tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        eos_token_id=eot,
        bos_token_id=eot,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    fast.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "corpus.txt").write_text("".join(TEXT))
    r = kiln("import", str(tmp_path / "gpt2"), "--name", "g", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "g"
    r = kiln(
        "train",
        "--resume",
        str(run),
        "--set",
        f"data.corpus={tmp_path / 'corpus.txt'}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "train.steps=20",
        "--set",
        "train.batch_size=8",
        "--set",
        "model.seq_len=32",
        "--set",
        "train.time_budget_s=0",
        "--set",
        "eval.every=0",
        "--set",
        "log.every=1",
        "--set",
        "log.plot=false",
        "--set",
        "guard.hang_min_s=0",
        "--set",
        "schedule.warmup_steps=2",
        "--set",
        "optim.lr=3e-3",
        "--set",
        "data.piece_chars=400",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert (run / "tokenizer.roles.json").is_file()
    assert json.loads((run / "tokenizer.roles.json").read_text())["eos"] == "<|endoftext|>"
    # it started from the imported weights (step 0 of the run is the imported model), not a fresh init
    start, _ = load(run, step=0)
    imported, tok = load(tmp_path / "gpt2")
    ids = torch.tensor([tok.encode("def add(a, b):")])
    assert torch.equal(start(ids), imported(ids))


def test_an_imported_model_has_transformers_loss_padding_rows_take_no_probability(tmp_path, tokenizer):
    """Kiln pads the vocabulary to a multiple of 64 (301 -> 320 here); after an import the padding
    rows are zeros, so their logits are 0. The loss (training's naive and chunked heads, the z-loss
    and evaluation) is over the tokenizer's tokens only: the same as transformers' on the same text."""
    from kiln.kernels.cross_entropy import chunked_linear_cross_entropy
    from kiln.objectives import Causal, z_loss_sum
    from kiln.runs.rundir import RunDir

    folder = export_folder(random_model(GPT2, tokenizer.vocab_size), GPT2, tokenizer, tmp_path / "gpt2")
    assert kiln("import", str(folder), "--name", "g", cwd=tmp_path).returncode == 0
    model = RunDir.open(tmp_path / "runs" / "g").load_model(device=torch.device("cpu"), warn=lambda _: None).model
    ids = batch(tokenizer)
    with torch.no_grad():
        logits = model(ids)
        theirs = hf_model(folder)(ids, labels=ids).loss.item()
        head = model.output_weight()
    assert logits.shape[-1] == 320 and not logits[..., 301:].any()  # the padding rows' logits: zeros
    objective = Causal(tokenizer, tokenizer.vocab_size)
    n = ids[:, 1:].numel()
    ours = objective.loss_sum(logits[:, :-1], ids[:, 1:]).item() / n
    assert abs(ours - theirs) <= 1e-5 * theirs, (ours, theirs)
    # the chunked head as training calls it (the head's rows up to the vocabulary) gives the same
    hidden = model(ids, head=lambda h, w: h)[:, :-1].reshape(-1, GPT2.d_model)
    chunked, z = chunked_linear_cross_entropy(hidden, head[: tokenizer.vocab_size], ids[:, 1:].reshape(-1), 16, False)
    assert abs(chunked.item() / n - theirs) <= 1e-5 * theirs
    assert torch.allclose(z, z_loss_sum(logits[:, :-1], ids[:, 1:], tokenizer.vocab_size), rtol=1e-5)
    # and training's own loss, naive and chunked heads, on the imported run's config
    from kiln.parallel.runtime import Parallel
    from kiln.train.module import TrainModule

    run = RunDir.open(tmp_path / "runs" / "g")
    for head in ("naive", "chunked"):
        cfg = load_config(base=run.config_dict(), overrides=[f"kernels.cross_entropy={head}", "train.precision=fp32"])
        par = Parallel.setup(cfg, torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        module = TrainModule(cfg, par, [model], [opt], objective, "fp32", ids.shape[0])
        with torch.no_grad():
            ce, _ = module.forward_loss(ids[:, :-1], ids[:, 1:], {})
        assert abs(ce.item() / n - theirs) <= 1e-5 * theirs, (head, ce.item() / n, theirs)


def test_an_imported_model_is_used_before_any_training(tmp_path, tokenizer):
    """After `kiln import`, sample, export (both formats), eval and `kiln.load` take step 0, the
    imported weights, by default and say so; a run whose only checkpoints are corrupt stays an error."""
    from safetensors.torch import load_file

    folder = export_folder(random_model(LLAMA, tokenizer.vocab_size), LLAMA, tokenizer, tmp_path / "llama")
    assert kiln("import", str(folder), "--name", "imp", cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "imp"
    r = kiln("sample", str(run), "--prompt", "def ", "--max-tokens", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no checkpoint yet: using step 0 (the imported weights)" in r.stderr and "at step 0" in r.stderr
    assert r.stdout.startswith("def ")
    r = kiln("export", str(run), "--out", str(tmp_path / "imp.safetensors"), cwd=tmp_path)
    assert r.returncode == 0 and "(step 0)" in r.stdout, r.stderr
    model, _ = load(folder)
    exported = load_file(tmp_path / "imp.safetensors")
    assert torch.equal(exported["layers.1.mlp.w2.weight"], model.model.state_dict()["layers.1.mlp.w2.weight"])
    r = kiln("export", str(run), "--format", "hf", "--out", str(tmp_path / "imp-hf"), cwd=tmp_path)
    assert r.returncode == 0 and "(step 0)" in r.stdout, r.stderr
    ids = torch.tensor([tokenizer.encode("def add(a, b):")])
    assert torch.equal(load(run)[0](ids), model(ids)) and torch.equal(load(tmp_path / "imp-hf")[0](ids), model(ids))
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "def add(a, b):", "choices": [" return a + b", " pass"], "gold": 0}\n')
    r = kiln("eval", str(run), "--suite", "choice", "-o", f"choice.tasks={task}", cwd=tmp_path)
    assert r.returncode == 0 and "step 0" in r.stdout + r.stderr, r.stderr
    (run / "checkpoints" / "step-00000005").mkdir(parents=True)  # a checkpoint without its manifest
    r = kiln("sample", str(run), "--max-tokens", "2", cwd=tmp_path)
    assert r.returncode == 2 and "no valid checkpoint" in r.stderr


def test_a_refused_import_exits_2_and_makes_no_run(tmp_path, tokenizer):
    folder = export_folder(random_model(LLAMA, tokenizer.vocab_size), LLAMA, tokenizer, tmp_path / "scaled")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    (folder / "config.json").write_text(json.dumps(config))
    r = kiln("import", str(folder), "--name", "scaled", cwd=tmp_path)
    assert r.returncode == 2 and "rope scaling" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "scaled").exists()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0}
    (folder / "config.json").write_text(json.dumps(config))
    r = kiln("import", str(folder), "--name", "pickled", cwd=tmp_path)
    assert r.returncode == 2 and "never pickles" in r.stderr and not (tmp_path / "runs" / "pickled").exists()


def test_imported_run_config_records_the_model(tmp_path, tokenizer):
    folder = export_folder(random_model(QWEN3, tokenizer.vocab_size), QWEN3, tokenizer, tmp_path / "q")
    r = kiln("import", str(folder), "--name", "q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = load_config(config_file=tmp_path / "runs" / "q" / "config.toml")
    assert (cfg.model.qk_norm, cfg.model.n_kv_heads, cfg.model.d_ff, cfg.model.rope_theta) == (True, 2, 136, 50000.0)
    r = kiln("import", str(folder), "--name", "q", cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
