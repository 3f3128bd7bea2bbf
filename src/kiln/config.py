"""Typed configuration: one dataclass per section, TOML presets, `--set a.b=c` overrides.

Every value is checked when the config is built; a mistake ends in a `ConfigError` whose
one-line message names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError


@dataclass
class ModelConfig:
    family: str = "decoder"  # decoder (GPT-style, causal) | encoder (BERT-style, bidirectional)
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (multi-head); fewer = grouped-query attention
    d_model: int = 256
    d_ff: int = 0  # 0 = 4*d_model for gelu, ~8/3*d_model (rounded to 64) for swiglu
    seq_len: int = 256
    max_seq_len: int = 0  # size of the learned position table; 0 = seq_len
    pos: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    qk_norm: bool = False
    init_std: float = 0.02


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # registered corpus name, or a file / directory / glob (comma-separated)
    text_field: str = "text"  # field of .jsonl records / column of .parquet files
    vocab_size: int = 4096
    tokenizer: str = ""  # path to an existing tokenizer.json; empty = train a byte-level BPE
    val_fraction: float = 0.05
    split_seed: int = 1234
    cache_dir: str = ".kiln-cache"
    max_docs: int = 0  # 0 = all documents
    workers: int = 0  # tokeniser threads; 0 = all cores


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    implementation: str = "auto"  # auto | fused | foreach | single


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying


@dataclass
class TrainConfig:
    steps: int = 1000
    tokens: int = 0  # > 0: train this many tokens instead of `steps`
    batch_size: int = 16  # sequences per optimizer step, global (all ranks, all micro-batches)
    batch_tokens: int = 0  # > 0: global batch in tokens instead (must be a multiple of seq_len)
    micro_batch_size: int = 0  # sequences per forward pass per rank; 0 = the whole per-rank batch
    seed: int = 0
    objective: str = "causal"  # causal | masked
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU intra-op threads; 0 = torch's default


@dataclass
class MaskConfig:
    """Masked-language-model corruption (train.objective = "masked"), as in BERT and RoBERTa."""
    rate: float = 0.15  # share of (non-special) tokens selected for prediction
    replace: float = 0.8  # of the selected: replaced by the mask token
    random: float = 0.1  # ... by a random non-special token
    keep: float = 0.1  # ... left unchanged (replace + random + keep = 1)
    whole_word: bool = False  # select whole words (all pieces of a word together)


@dataclass
class EvalConfig:
    every: int = 200  # 0 = only at the end
    batches: int = 8  # validation batches of train.batch_size sequences
    prompts: list[str] = field(default_factory=lambda: ["def ", "import ", "class "])
    sample_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    suites: list[str] = field(default_factory=list)  # evaluation suites run at every evaluation (kiln.eval.suites)


@dataclass
class CheckpointConfig:
    every: int = 500  # 0 = only at the end
    keep: int = 3  # keep the newest `keep` checkpoints (0 = all) ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of this
    on_error: str = "stop"  # a failed write (e.g. disk full): stop, or continue without it


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # data-parallel replicas (HSDP's outer dimension)
    dp_shard: int = -1  # FSDP2 shards; -1 = the rest of the world
    tp: int = 1  # tensor parallel (with sequence parallel for norms and dropout)
    pp: int = 1  # pipeline stages
    pp_schedule: str = "1f1b"  # 1f1b | interleaved-1f1b | gpipe
    pp_microbatches: int = 4
    pp_stages_per_rank: int = 2  # interleaved-1f1b only
    activation_checkpoint: str = "none"  # none | selective (every other block) | full
    compile_blocks: bool = False  # torch.compile each block (instead of train.compile's whole step)
    async_checkpoint: bool = False  # distributed checkpoints: write in the background


@dataclass
class GuardConfig:
    enabled: bool = True
    window: int = 50  # rolling window of healthy steps that defines "normal"
    min_history: int = 20  # steps of history before spikes are judged
    k: float = 6.0  # a spike is more than k standard deviations above the window's mean
    on_nonfinite: str = "skip"  # skip | rollback | stop
    on_spike: str = "rollback"  # skip | rollback | stop | ignore
    margin: int = 0  # rollback: extra batches skipped after the spike
    lr_factor: float = 1.0  # rollback: multiply the learning rate by this ...
    lr_factor_steps: int = 0  # ... for this many steps after the restored checkpoint
    max_interventions: int = 10  # then stop with a message
    hang_factor: float = 20.0  # watchdog: a step this many times the median step time is a hang ...
    hang_min_s: float = 600.0  # ... if it also lasts at least this long (0 = no watchdog)
    collective_timeout_s: float = 900.0  # a blocked collective fails after this


@dataclass
class LogConfig:
    every: int = 10  # metrics line and console line every N steps
    plot: bool = True  # write loss.png at the end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # ---- derived quantities (not stored) ----
    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over all ranks."""
        if self.train.batch_tokens:
            return self.train.batch_tokens // self.model.seq_len
        return self.train.batch_size

    @property
    def total_steps(self) -> int:
        if self.train.tokens:
            per_step = self.global_batch * self.model.seq_len
            return -(-self.train.tokens // per_step)
        return self.train.steps


CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": ("decoder", "encoder"),
    "model.pos": ("learned", "rope"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "optim.name": ("adamw",),
    "optim.implementation": ("auto", "fused", "foreach", "single"),
    "schedule.name": ("cosine", "wsd", "constant"),
    "train.objective": ("causal", "masked"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.pp_schedule": ("1f1b", "interleaved-1f1b", "gpipe"),
    "parallel.activation_checkpoint": ("none", "selective", "full"),
    "guard.on_nonfinite": ("skip", "rollback", "stop"),
    "guard.on_spike": ("skip", "rollback", "stop", "ignore"),
    "checkpoint.on_error": ("stop", "continue"),
}


# --------------------------------------------------------------------------- loading

def preset_names() -> list[str]:
    folder = resources.files("kiln") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: not valid TOML ({e})") from None


def preset_dict(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(names)}")
    text = (resources.files("kiln") / "presets" / f"{name}.toml").read_text()
    return _read_toml(text, f"preset {name}")


def file_dict(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a TOML file to --config")
    return _read_toml(p.read_text(), str(p))


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value`; the value is read as TOML (numbers, booleans, lists), else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected section.key=value, e.g. --set train.steps=200")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if key.count(".") != 1:
        raise ConfigError(f"--set '{item}': the key must be section.key, e.g. optim.lr")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = item.split("=", 1)[1]  # bare strings such as data.corpus=my/files/*.txt, spaces kept
    return key, value


def _expects_text(section: str, name: str) -> bool:
    cls = {f.name: f.default_factory for f in dataclasses.fields(Config)}.get(section)  # type: ignore[misc]
    return cls is not None and typing.get_type_hints(cls).get(name) is str


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Build a validated `Config`: defaults < preset < file < `--set` overrides."""
    raw: dict[str, Any] = dict(base or {})
    if preset:
        raw = merge(raw, preset_dict(preset))
    if config_file:
        raw = merge(raw, file_dict(config_file))
    for item in overrides:
        key, value = parse_override(item)
        section, name = key.split(".")
        if _expects_text(section, name) and not isinstance(value, str):
            value = item.split("=", 1)[1]  # e.g. data.corpus=2024 is a path, not a number
        raw = merge(raw, {section: {name: value}})
    return from_dict(raw)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is list:
        (inner,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {kind} for {key}")


def from_dict(raw: dict[str, Any]) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(_unknown(section, "section", list(sections)))
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        cls = sections[section].default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in hints:
                raise ConfigError(_unknown(key, "key", [f"{section}.{k}" for k in hints]))
            kwargs[name] = _coerce(key, value, hints[name])
        built[section] = cls(**kwargs)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _unknown(name: str, what: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
    return f"unknown config {what} '{name}'{hint}"


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- validation

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    flat = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() for k, v in sec.items()}
    for key, allowed in CHOICES.items():
        _require(flat[key] in allowed, f"{key} = {flat[key]!r} is not allowed; choose one of {', '.join(allowed)}")

    m, t, d = cfg.model, cfg.train, cfg.data
    positive = ["model.n_layers", "model.n_heads", "model.d_model", "model.seq_len", "data.vocab_size",
                "train.batch_size", "eval.batches", "log.every"]
    for key in positive:
        _require(flat[key] > 0, f"{key} must be positive, got {flat[key]}")
    non_negative = ["model.n_kv_heads", "model.d_ff", "model.max_seq_len", "train.steps", "train.tokens",
                    "train.batch_tokens", "train.micro_batch_size", "train.threads", "eval.every",
                    "eval.sample_tokens", "checkpoint.every", "schedule.warmup_steps", "data.max_docs",
                    "data.workers", "optim.grad_clip", "optim.weight_decay", "eval.top_k", "train.seed",
                    "data.split_seed"]
    for key in non_negative:
        _require(flat[key] >= 0, f"{key} must be >= 0, got {flat[key]}")

    _require(m.d_model % m.n_heads == 0,
             f"model.n_heads = {m.n_heads} must divide model.d_model = {m.d_model}")
    kv = m.n_kv_heads or m.n_heads
    _require(kv <= m.n_heads and m.n_heads % kv == 0,
             f"model.n_kv_heads = {kv} must divide model.n_heads = {m.n_heads}")
    head_dim = m.d_model // m.n_heads
    _require(m.pos != "rope" or head_dim % 2 == 0,
             f"model.pos = 'rope' needs an even head size, got d_model/n_heads = {head_dim}")
    if m.max_seq_len:
        _require(m.seq_len <= m.max_seq_len,
                 f"model.seq_len = {m.seq_len} is longer than the position table model.max_seq_len = "
                 f"{m.max_seq_len}; raise model.max_seq_len (or set it to 0 = seq_len)")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(m.init_std > 0, f"model.init_std must be positive, got {m.init_std}")
    _require(m.norm_eps > 0, f"model.norm_eps must be positive, got {m.norm_eps}")

    _require(d.vocab_size >= 260 or bool(d.tokenizer),
             f"data.vocab_size = {d.vocab_size} is too small for a byte-level BPE; use at least 260")
    _require(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _require(bool(d.corpus.strip()), "data.corpus is empty; name a corpus (e.g. stdlib) or a path")

    o = cfg.optim
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _require(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    s = cfg.schedule
    _require(0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    _require(0.0 < s.decay_fraction <= 1.0, f"schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}")

    if t.batch_tokens:
        _require(t.batch_tokens % m.seq_len == 0,
                 f"train.batch_tokens = {t.batch_tokens} must be a multiple of model.seq_len = {m.seq_len}")
    _require(cfg.total_steps > 0, "train.steps (or train.tokens) must be positive")
    if t.micro_batch_size:
        _require(cfg.global_batch % t.micro_batch_size == 0,
                 f"train.micro_batch_size = {t.micro_batch_size} must divide the global batch of "
                 f"{cfg.global_batch} sequences")
    _require(cfg.eval.temperature >= 0, "eval.temperature must be >= 0")
    if cfg.eval.suites:
        from kiln.eval.suites import check_suite_names  # imported only when suites are named

        check_suite_names(cfg.eval.suites)

    g = cfg.guard
    for key in ("window", "min_history", "max_interventions"):
        _require(getattr(g, key) >= 1, f"guard.{key} must be >= 1, got {getattr(g, key)}")
    _require(g.min_history <= g.window, f"guard.min_history = {g.min_history} must be <= guard.window = {g.window}")
    _require(g.k > 0, f"guard.k must be positive, got {g.k}")
    _require(g.lr_factor > 0, f"guard.lr_factor must be positive, got {g.lr_factor}")
    for key in ("margin", "lr_factor_steps", "hang_min_s"):
        _require(getattr(g, key) >= 0, f"guard.{key} must be >= 0, got {getattr(g, key)}")
    _require(g.hang_factor > 1, f"guard.hang_factor must be > 1, got {g.hang_factor}")
    _require(g.collective_timeout_s > 0, f"guard.collective_timeout_s must be positive, got {g.collective_timeout_s}")
    _require(cfg.checkpoint.keep >= 0 and cfg.checkpoint.keep_every >= 0, "checkpoint.keep and keep_every must be >= 0")

    par = cfg.parallel
    for key in ("dp_replicate", "tp", "pp", "pp_microbatches", "pp_stages_per_rank"):
        _require(getattr(par, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(par, key)}")
    _require(par.dp_shard == -1 or par.dp_shard >= 1, f"parallel.dp_shard must be >= 1 or -1 (the rest of the "
             f"world), got {par.dp_shard}")
    _require(m.n_heads % par.tp == 0 and (m.n_kv_heads or m.n_heads) % par.tp == 0,
             f"parallel.tp = {par.tp} must divide model.n_heads = {m.n_heads} and the KV heads = {m.n_kv_heads or m.n_heads}")
    _require(m.seq_len % par.tp == 0, f"parallel.tp = {par.tp} must divide model.seq_len = {m.seq_len} "
             "(sequence parallelism splits the sequence)")
    if par.pp > 1:
        stages = par.pp * (par.pp_stages_per_rank if par.pp_schedule == "interleaved-1f1b" else 1)
        _require(m.n_layers % stages == 0, f"model.n_layers = {m.n_layers} must be divisible by the {stages} "
                 "pipeline stages (parallel.pp x stages per rank)")
        _require(not m.tie_embeddings, "parallel.pp > 1 needs model.tie_embeddings = false (the embedding and the "
                 "output layer live on different stages)")
    if par.tp > 1:
        _require(not m.tie_embeddings, "parallel.tp > 1 needs model.tie_embeddings = false (the shared matrix "
                 "would need two layouts)")
    if m.family == "encoder":
        _require(par.tp == 1 and par.pp == 1, "model.family = 'encoder' trains with data parallelism (FSDP) only "
                 "for now; set parallel.tp = 1 and parallel.pp = 1")

    k = cfg.mask
    _require(0.0 < k.rate < 1.0, f"mask.rate must be in (0, 1), got {k.rate}")
    for key in ("replace", "random", "keep"):
        _require(0.0 <= getattr(k, key) <= 1.0, f"mask.{key} must be in [0, 1], got {getattr(k, key)}")
    _require(abs(k.replace + k.random + k.keep - 1.0) < 1e-6,
             f"mask.replace + mask.random + mask.keep must add up to 1, got {k.replace} + {k.random} + {k.keep} = "
             f"{k.replace + k.random + k.keep:g}")

    if t.objective == "causal":
        _require(m.family == "decoder", "train.objective = 'causal' needs model.family = 'decoder' "
                 "(an encoder sees the future); use train.objective = 'masked' for an encoder")
    if t.objective == "masked":
        _require(m.family == "encoder", "train.objective = 'masked' needs model.family = 'encoder' "
                 "(a causal decoder cannot see the tokens right of a mask); set model.family = 'encoder'")


# --------------------------------------------------------------------------- resuming

# What may change when a run is resumed: how it is optimised, evaluated, saved, logged, guarded
# and laid out. Everything else (model shape, data, tokenizer, seed, batch) defines the run.
RESUMABLE_SECTIONS = ("optim", "schedule", "eval", "checkpoint", "log", "guard", "parallel")
RESUMABLE_KEYS = ("train.steps", "train.tokens", "train.compile", "train.threads", "train.micro_batch_size",
                  "train.precision", "train.device", "data.cache_dir", "data.workers")


def check_resume_changes(saved: Config, new: Config) -> None:
    """Refuse a resume whose config changes what the run is, naming the key and what may change."""
    old_flat = {f"{s}.{k}": v for s, sec in to_dict(saved).items() for k, v in sec.items()}
    new_flat = {f"{s}.{k}": v for s, sec in to_dict(new).items() for k, v in sec.items()}
    for key, value in new_flat.items():
        if value != old_flat.get(key) and key.split(".")[0] not in RESUMABLE_SECTIONS and key not in RESUMABLE_KEYS:
            raise ConfigError(f"{key} cannot change on --resume ({old_flat.get(key)!r} -> {value!r}): it defines the "
                              f"run; allowed changes: the {', '.join(RESUMABLE_SECTIONS)} sections and "
                              f"{', '.join(RESUMABLE_KEYS)}; start a new run (or fork) to change it")


# --------------------------------------------------------------------------- writing

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:  # TOML basic strings: escape backslash, quote and every control character
            if ch in ('"', "\\"):
                out.append("\\" + ch)
            elif ord(ch) < 0x20 and ch != "\t" or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config | dict[str, Any]) -> str:
    data = to_dict(cfg) if isinstance(cfg, Config) else cfg
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)
