"""Typed configuration: one dataclass per section, TOML presets, `--set a.b=c` overrides.

This layer checks types and values only; names of registered components (family, objective,
suites, callbacks and their options) are resolved by `kiln.train.resolve` once plugins have loaded, so
whether a config parses never depends on which user modules are importable. A mistake ends in a
`ConfigError` whose one-line message names the key and what is allowed. Family-specific checks
(e.g. the `[model.moe]` table's) live in the family's spec."""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kiln.config_rules import require as _require
from kiln.config_rules import validate_ranges, validate_relations, validate_sections
from kiln.errors import ConfigError

# ---- the [model] section: common transformer fields plus one table per family that needs more.
# Declared vs resolved: a field whose 0 means "the default" (n_kv_heads, d_ff, max_seq_len,
# moe.d_ff) keeps the declared 0, in memory and in a run's config.toml; code reads the one
# property that resolves it (kv_heads, ff_hidden, positions, expert_hidden). Persisting the
# declared value keeps forks right: `kiln fork --set model.n_heads=8` of a run that left
# n_kv_heads at 0 gets 8 KV heads, where a persisted resolved 4 would silently make it GQA.
# Flat keys: the tables' keys were flat `model.moe_*` / image keys before; those stay the dotted
# names that messages, `--set`, `kiln fork --set` and `flatten` use (every run folder, doctor fix
# and script so far spells them so). `nest_aliases` is the one place a flat key becomes its
# table's key (files, presets, run folders, --set alike); `ModelConfig(moe_experts=8)` and
# `cfg.model.moe_experts` keep working in Python.


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """Llama's choice: 2/3 of 4*d (same parameters as a GELU MLP), rounded up."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class MoEConfig:
    """`[model.moe]` (model.family = "moe": kiln.model.moe, moe_spec); flat keys `model.moe_<key>`."""

    experts: int = 0  # routed experts per MoE layer
    top_k: int = 2  # experts each token goes to
    every: int = 1  # every k-th layer is MoE ...
    first_dense: int = 0  # ... after this many dense layers
    d_ff: int = 0  # each expert's SwiGLU hidden size; 0 = the SwiGLU default for model.d_model
    shared_experts: int = 0  # experts every token goes through as well (DeepSeek)
    capacity_factor: float = 0.0  # > 0: an expert takes at most factor * tokens * k / experts; 0 = dropless
    score: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    norm_topk: bool = True  # renormalise the k chosen gates to sum to 1
    aux_loss: float = 0.0  # Switch / GShard load-balancing loss coefficient (Switch used 1e-2)
    seq_aux_loss: float = 0.0  # per-sequence balancing loss (DeepSeek-V2/V3)
    z_loss: float = 0.0  # router z-loss (ST-MoE used 1e-3)
    bias_rate: float = 1e-3  # auxiliary-loss-free balancing bias step (DeepSeek-V3's); 0 = off


@dataclass
class VisionConfig:
    """`[model.vision]` (model.family = "vlm": kiln.model.vision); flat keys in VISION_ALIASES."""

    image_size: int = 8  # images are resized and centre-cropped to this square (pixels) ...
    patch_size: int = 2  # ... and cut into patches of this side: (image_size / patch_size)^2 positions an image
    channels: int = 1  # 1 = grey, 3 = RGB
    encoder: str = "patch"  # patch: a ViT-style patch stem trained jointly | frozen: loaded and kept fixed
    encoder_from: str = ""  # encoder = "frozen": safetensors file with stem.* and patch_pos.* tensors

    @property
    def n_patches(self) -> int:
        """Sequence positions one image takes."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_values(self) -> int:
        """Pixel values in one patch."""
        return self.patch_size * self.patch_size * self.channels


@dataclass
class ModelConfig:
    family: str = "decoder"  # a registered model family: decoder (GPT-style), encoder (BERT-style), or a plugin's
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
    mlp: str = "gelu"  # gelu (tanh approximation) | gelu_exact (erf, BERT's) | swiglu
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    qk_norm: bool = False  # RMS-normalise queries and keys per head (bounds the attention logits)
    post_norm: bool = False  # also normalise each sub-layer's output before the residual add (sandwich norm)
    # The BERT-style options below are options of the shared blocks and embeddings (any family's
    # spec may allow them), so they stay common fields rather than a `[model.bert]` table.
    norm_position: str = "pre"  # pre: x + f(norm(x)) and a final norm; post: norm(x + f(x)) as BERT (encoder only)
    embed_norm: bool = False  # normalise the summed embeddings (BERT)
    type_vocab_size: int = 0  # token-type (segment) embeddings; Kiln feeds type 0 (BERT has 2)
    init_std: float = 0.02
    parametrization: str = "standard"  # standard | mup: hyperparameters transfer from mup_base_width (kiln.model.mup)
    mup_base_width: int = 128  # the width µP's hyperparameters were tuned at (d_model there)
    init_from: str = ""  # a safetensors file of full Kiln-named weights (kiln import / kiln export) to start from
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    # ---- resolved values: the one place each "0 = default" is decided (see the module docstring)
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_hidden(self) -> int:
        """The dense MLP's hidden size."""
        return self.d_ff or (swiglu_hidden(self.d_model) if self.mlp == "swiglu" else 4 * self.d_model)

    @property
    def positions(self) -> int:
        """Length of the position tables (learned embedding, RoPE)."""
        return self.max_seq_len or self.seq_len

    @property
    def expert_hidden(self) -> int:
        """Each routed (and shared) expert's SwiGLU hidden size."""
        return self.moe.d_ff or swiglu_hidden(self.d_model)

    if not TYPE_CHECKING:  # hidden from mypy, so code reading a flat name fails the type check

        def __getattr__(self, name: str) -> Any:
            """Flat legacy names read through to their table (`cfg.model.moe_experts`), for plugins
            and scripts written before the tables; only called for names that are no attribute."""
            alias = MODEL_ALIASES.get(name)
            table = self.__dict__.get(alias[0]) if alias else None
            if alias is None or table is None:
                raise AttributeError(f"'ModelConfig' object has no attribute {name!r}")
            return getattr(table, alias[1])


FAMILY_TABLES: dict[str, type] = {"moe": MoEConfig, "vision": VisionConfig}
VISION_ALIASES = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "image_channels": "channels",
    "image_encoder": "encoder",
    "image_encoder_from": "encoder_from",
}
# flat `model.<alias>` key -> (table, key in the table)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    **{f"moe_{f.name}": ("moe", f.name) for f in dataclasses.fields(MoEConfig)},
    **{alias: ("vision", key) for alias, key in VISION_ALIASES.items()},
}
_FLAT_NAME = {target: alias for alias, target in MODEL_ALIASES.items()}

_generated_init = ModelConfig.__init__


def _init_accepting_aliases(self: ModelConfig, *args: Any, **kwargs: Any) -> None:
    """`ModelConfig(moe_experts=8)` and `dataclasses.replace(m, moe_top_k=1)` as before the
    tables; the table is copied, never changed in place (`replace` hands over the same object)."""
    flat = {k: kwargs.pop(k) for k in [k for k in kwargs if k in MODEL_ALIASES]}
    _generated_init(self, *args, **kwargs)
    for alias, value in flat.items():
        table, key = MODEL_ALIASES[alias]
        setattr(self, table, dataclasses.replace(getattr(self, table), **{key: value}))


ModelConfig.__init__ = _init_accepting_aliases  # type: ignore[method-assign]


def nest_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw config dict (a file, a preset, `--set` items, a run's config.toml) with every flat
    `model.<alias>` key moved into its family table; the input is not changed."""
    model = raw.get("model")
    if not isinstance(model, dict) or not any(k in MODEL_ALIASES for k in model):
        return raw
    model = dict(model)
    for alias in [k for k in model if k in MODEL_ALIASES]:
        name, key = MODEL_ALIASES[alias]
        value, table = model.pop(alias), model.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"model.{name} is a table ([model.{name}]), got {table!r}")
        if key in table and table[key] != value:
            raise ConfigError(
                f"model.{alias} = {value!r} and model.{name}.{key} = {table[key]!r} set the same key; keep one"
            )
        model[name] = {**table, key: value}
    return {**raw, "model": model}


def flat_model_keys(model: dict[str, Any]) -> dict[str, Any]:
    """`to_dict`'s model section as `model.<key>` -> value, the family tables' keys under their
    flat names (the dotted names messages and `kiln.changes` use)."""
    out: dict[str, Any] = {}
    for k, v in model.items():
        if k in FAMILY_TABLES:
            out.update({f"model.{_FLAT_NAME[(k, key)]}": value for key, value in v.items()})
        else:
            out[f"model.{k}"] = v
    return out


@dataclass
class SourceConfig:
    """One `[[data.sources]]` table: a corpus of a weighted mixture (kiln.data.mixture)."""

    name: str = ""  # letters, digits, - and _: it names metrics (val_loss/<name>) and --set data.sources.<name>.*
    corpus: str = ""  # any corpus data.corpus accepts
    weight: float = 1.0  # share of the training batches (relative to the other sources)
    max_epochs: float = 0.0  # the source stops after this many passes over it (0 = repeats as often as drawn)
    text_field: str = ""  # .jsonl / .parquet field of its text; "" = data.text_field


@dataclass
class StageConfig:
    """One `[[data.stages]]` table: from `start` (a step) or `start_fraction` of the run's steps
    on, the sources are drawn by `weights` (sources it does not name: weight 0)."""

    start: int = -1
    start_fraction: float = -1.0
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # registered corpus name, or a file / directory / glob (comma-separated)
    text_field: str = "text"  # field of .jsonl records / column of .parquet files
    vocab_size: int = 4096
    tokenizer: str = ""  # path to an existing tokenizer.json; empty = train a byte-level BPE
    val_fraction: float = 0.05
    split_seed: int = 1234
    piece_chars: int = 8192  # documents longer than this are split into pieces before the train/val split
    cache_dir: str = ".kiln-cache"
    max_docs: int = 0  # 0 = all documents
    workers: int = 0  # tokeniser threads; 0 = all cores
    tokenizer_sample_mb: float = 64.0  # MB of training text the tokenizer learns from (a content-hashed sample)
    image_field: str = "image"  # image-text data (model.family = "vlm"): the image column of .parquet files
    image_placement: str = "prefix"  # prefix: a sample's images before its text | inline: where they occur
    with_images: bool = True  # image-text data: false trains on the texts alone (the baseline images must beat)
    loader_workers: int = 2  # image-text data: processes decoding and packing batches ahead of the step
    # a weighted mixture: given, these replace `corpus` (and `text_field` unless a source names its own)
    sources: list[SourceConfig] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)  # a curriculum: the mixture's weights by step


@dataclass
class OptimGroupConfig:
    """One `[[optim.groups]]` table (kiln.train.optim_groups): the parameters matching `params`
    (name globs) or of `kind`, and the rule and hyperparameters that update them."""

    name: str = ""  # letters, digits, - and _: --set optim.groups.<name>.lr=...
    params: list[str] = field(default_factory=list)  # globs over parameter names, e.g. "layers.*.attn.*"
    kind: str = ""  # hidden | embedding | head | norm_bias
    optimizer: str = "adamw"  # adamw | muon
    lr: float = 0.0  # peak LR; 0 = optim.lr (adamw) or optim.muon_lr (muon); times lr_mult
    lr_mult: float = 1.0
    weight_decay: float = -1.0  # -1 = optim.weight_decay for matrices, 0 for 1-D tensors
    betas: list[float] = field(default_factory=list)  # adamw [beta1, beta2]; [] = optim's


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (hidden matrices; AdamW the rest) | adamw8bit | adamw4bit (torchao)
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    implementation: str = "auto"  # auto | fused | foreach | single
    muon_lr: float = 0.02  # Muon's peak LR (Keller Jordan's recipe, with muon_adjust_lr = "spectral")
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "spectral"  # spectral: max(1, rows/cols)^0.5 | match_rms_adamw: 0.2 sqrt(max) | none
    groups: list[OptimGroupConfig] = field(default_factory=list)  # [[optim.groups]]; [] = by optim.name


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
    time_budget_s: float = 0.0  # > 0: measure the step time and cut the run to fit this many seconds of steps
    batch_size: int = 16  # sequences per optimizer step, global (all ranks, all micro-batches)
    batch_tokens: int = 0  # > 0: global batch in tokens instead (must be a multiple of seq_len)
    micro_batch_size: int = 0  # sequences per forward pass per rank; 0 = the whole per-rank batch
    seed: int = 0
    z_loss: float = 0.0  # > 0: add z_loss * log(Z)^2 per predicted token (PaLM's output-logit stabiliser)
    objective: str = "causal"  # a registered objective: causal, masked, or a plugin's
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU intra-op threads; 0 = torch's default
    tf32: bool = True  # CUDA fp32 matrix products and convolutions on TF32 tensor cores (no effect on CPU)
    deterministic: bool = False  # deterministic algorithms (and cuBLAS workspace): a resumed GPU run is bit-identical


@dataclass
class MaskConfig:
    """Masked-language-model corruption (train.objective = "masked"), as in BERT and RoBERTa."""

    rate: float = 0.15  # share of (non-special) tokens selected for prediction
    replace: float = 0.8  # of the selected: replaced by the mask token
    random: float = 0.1  # ... by a random non-special token
    keep: float = 0.1  # ... left unchanged (replace + random + keep = 1)
    whole_word: bool = False  # select whole words (all pieces of a word together)


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto (Triton on CUDA when installed) | torch | triton: fused RMSNorm, RoPE, SwiGLU, CE
    float8: str = "none"  # none | tensorwise | rowwise: FP8 matrix products in the blocks (torchao, sm89+ GPUs)
    sparsity: str = "none"  # none | 2:4: semi-structured sparse MLP weights (torchao, CUDA only)
    cross_entropy: str = "naive"  # naive | chunked: linear + cross-entropy without the full logits (kiln.kernels)
    chunk_size: int = 1024  # chunked: tokens per chunk (its float32 logits: chunk x vocabulary x 4 bytes)


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
    ep: int = 1  # expert parallel (model.family = "moe"): splits each dp_shard group's experts over ep ranks
    pp: int = 1  # pipeline stages
    pp_schedule: str = "1f1b"  # 1f1b | interleaved-1f1b | gpipe
    pp_microbatches: int = 4
    pp_stages_per_rank: int = 2  # interleaved-1f1b only
    pp_layers: list[int] = field(default_factory=list)  # layers per pipeline stage (mixed devices); [] = even
    dp_batch_shares: list[int] = field(default_factory=list)  # sequences per data-parallel rank; [] = even
    activation_checkpoint: str = "none"  # none | selective (every other block) | full
    compile_blocks: bool = False  # torch.compile each block (instead of train.compile's whole step)
    async_checkpoint: bool = False  # distributed checkpoints: write in the background
    # under gradient accumulation, FSDP's gradient reduce-scatter on every micro-batch, or only on a
    # step's last (unsharded gradients kept meanwhile); "auto" decides from the memory model
    grad_sync: str = "auto"  # auto | every_microbatch | last_microbatch

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pipeline rank holds: pp_stages_per_rank under interleaved-1f1b, else 1."""
        return self.pp_stages_per_rank if self.pp_schedule == "interleaved-1f1b" else 1

    @property
    def pipeline_stages(self) -> int:
        """Pipeline stages in all (pp x stages per rank)."""
        return self.pp * self.stages_per_rank


@dataclass
class GuardConfig:
    enabled: bool = True
    window: int = 50  # rolling window of healthy steps that defines "normal"
    min_history: int = 20  # steps of history before spikes are judged
    k: float = 6.0  # a spike is more than k robust deviations (1.4826 MAD of the log) above the median ...
    min_loss_jump: float = 1.25  # ... and a loss at least this many times the recent level (bench/faults.py)
    min_grad_jump: float = 4.0  # ... or a gradient norm at least this many times the median norm
    k_corroborated: float = 3.0  # a loss jump whose step's gradient norm spikes too needs only this many deviations
    on_nonfinite: str = "skip"  # skip | rollback | stop
    on_spike: str = "skip"  # a loss spike: skip | rollback | stop | ignore
    on_grad_spike: str = "record"  # a gradient-norm spike alone: record | skip | ignore
    persist: int = 3  # loss spikes in a row: the loss is not recovering ...
    on_persistent: str = "rollback"  # ... then: rollback | skip | stop
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
class DebugConfig:
    """Runtime invariants (kiln.train.callbacks.invariants): checked on every rank while training."""

    invariants: bool = False  # check replicas, data disjointness, loss normaliser, optimizer steps
    invariants_every: int = 50  # ... every N steps (and at step 1)
    count_syncs: bool = False  # count host syncs inside each step; metrics.jsonl gains `host_syncs`


@dataclass
class FaultsConfig:
    """Faults injected on purpose (kiln.train.callbacks.faults), to measure how the guard and
    `kiln doctor` react. Steps are completed-step numbers as in metrics.jsonl; 0 / [] = off."""

    nonfinite_loss: list[int] = field(default_factory=list)  # the loss of these steps is NaN
    nonfinite_grad: list[int] = field(default_factory=list)  # a gradient of these steps is inf
    corrupt_batch: list[int] = field(default_factory=list)  # these steps train on random tokens (a loss spike)
    lr_high: int = 0  # from this step on, the learning rate is multiplied by lr_high_factor (divergence)
    lr_high_factor: float = 100.0
    lr_low: int = 0  # from this step on, multiplied by lr_low_factor (a plateau)
    lr_low_factor: float = 1e-3
    repeat_batch: int = 0  # from this step on, every step trains on this step's batch (repeated data)
    entropy_collapse: int = 0  # from this step on, one layer's attention collapses onto one key
    dead_units: int = 0  # from this step on, dead_fraction of one layer's MLP units output zero
    dead_fraction: float = 0.5
    layer: int = 0  # the layer of entropy_collapse and dead_units
    slow_steps: list[int] = field(default_factory=list)  # these steps take slow_s seconds longer
    slow_s: float = 1.0
    slow_rank: int = -1  # this data-parallel rank is slow_rank_s slower at every step
    slow_rank_s: float = 0.2
    throttle_rank: int = -1  # this data-parallel rank computes throttle_factor times slower (a slower device)
    throttle_factor: float = 2.0
    hang: int = 0  # this step blocks for hang_s seconds (the watchdog's case)
    hang_s: float = 3600.0
    loader_stall: list[int] = field(default_factory=list)  # reading these steps' batches takes stall_s more
    stall_s: float = 1.0
    corrupt_checkpoint: int = 0  # the checkpoint of this step is damaged after it is committed
    tokenizer_mismatch: bool = False  # the run's tokenizer.json is replaced by one that does not fit the shards


# The one list of fault switches (the fault callback, `any_fault` and the doctor's remedies read it);
# every other [faults] key sizes one of them. A test checks that each key is one or the other.
FAULT_TRIGGERS = (
    "nonfinite_loss",
    "nonfinite_grad",
    "corrupt_batch",
    "lr_high",
    "lr_low",
    "repeat_batch",
    "entropy_collapse",
    "dead_units",
    "slow_steps",
    "slow_rank",
    "throttle_rank",
    "hang",
    "loader_stall",
    "corrupt_checkpoint",
    "tokenizer_mismatch",
)
FAULT_PARAMETERS = (
    "lr_high_factor",
    "lr_low_factor",
    "dead_fraction",
    "layer",
    "slow_s",
    "slow_rank_s",
    "throttle_factor",
    "hang_s",
    "stall_s",
)


@dataclass
class CallbacksConfig:
    """Optional callbacks by registered name; each one's options in a `[callbacks.<name>]` table
    (checked against the callback's own option types once the registries are loaded)."""

    enabled: list[str] = field(default_factory=list)  # extras, on top of the core set
    # core callbacks to leave out (evaluation, checkpoints, samples, throughput, console, plot); listing
    # extras never drops one
    disabled: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

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


# Sections whose tables may hold sub-tables of options for a named component.
NESTED_SECTIONS = {"callbacks": "options"}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.pos": ("learned", "rope"),
    "model.parametrization": ("standard", "mup"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "gelu_exact", "swiglu"),
    "model.norm_position": ("pre", "post"),
    "model.image_encoder": ("patch", "frozen"),
    "data.image_placement": ("prefix", "inline"),
    "optim.name": ("adamw", "muon", "adamw8bit", "adamw4bit"),
    "optim.muon_adjust_lr": ("spectral", "match_rms_adamw", "none"),
    "optim.implementation": ("auto", "fused", "foreach", "single"),
    "schedule.name": ("cosine", "wsd", "constant"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "kernels.backend": ("auto", "torch", "triton"),
    "kernels.cross_entropy": ("naive", "chunked"),
    "kernels.float8": ("none", "tensorwise", "rowwise"),
    "kernels.sparsity": ("none", "2:4"),
    "parallel.pp_schedule": ("1f1b", "interleaved-1f1b", "gpipe"),
    "parallel.activation_checkpoint": ("none", "selective", "full"),
    "parallel.grad_sync": ("auto", "every_microbatch", "last_microbatch"),
    "guard.on_nonfinite": ("skip", "rollback", "stop"),
    "guard.on_spike": ("skip", "rollback", "stop", "ignore"),
    "guard.on_grad_spike": ("record", "skip", "ignore"),
    "guard.on_persistent": ("rollback", "skip", "stop"),
    "checkpoint.on_error": ("stop", "continue"),
}


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


def parse_value(raw: str) -> Any:
    """A value typed on the command line: read as TOML (numbers, booleans, lists, quoted
    strings), else taken as the plain string (paths such as my/files/*.txt)."""
    try:
        return tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return raw.strip()


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` (or `section.name.key=value` for option tables such as
    `callbacks.layer_stats.every=10`, or `data.sources.<name>.key=value` for a mixture's
    source); the value is read by `parse_value`."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected section.key=value, e.g. --set train.steps=200")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    named_table = len(parts) == 4 and parts[:2] in (["data", "sources"], ["optim", "groups"])
    if not (len(parts) in (2, 3) or named_table) or not all(parts):
        raise ConfigError(
            f"--set '{item}': the key must be section.key (or section.name.key for option "
            "tables, data.sources.<name>.key or optim.groups.<name>.key for a named table), e.g. optim.lr"
        )
    return key, parse_value(raw)


def _expects_text(parts: list[str]) -> bool:
    """The key names a string field (a flat model alias, or a key of a family table)."""
    if len(parts) == 2 and parts[0] == "model" and parts[1] in MODEL_ALIASES:
        parts = ["model", *MODEL_ALIASES[parts[1]]]
    kind: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(kind):
            return False
        kind = typing.get_type_hints(kind).get(part)
    return kind is str


def merge(base: dict[str, Any], top: dict[str, Any], path: str = "") -> dict[str, Any]:
    """`top` over `base`, table by table (nested option tables merge too)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{path}{key}.")
        elif isinstance(value, dict) and _named_tables(out.get(key)):
            out[key] = _merge_named(f"{path}{key}", out[key], value)
        else:
            out[key] = value
    return out


def _named_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) and "name" in t for t in value)


def _merge_named(key: str, tables: list[dict[str, Any]], top: dict[str, Any]) -> list[dict[str, Any]]:
    """`--set data.sources.<name>.weight=W`: a change to the table of that name in an array."""
    out = [dict(t) for t in tables]
    names = [t["name"] for t in out]
    for name, change in top.items():
        if name not in names:
            raise ConfigError(f"--set {key}.{name}: no table of {key} is named {name!r} (names: {', '.join(names)})")
        if not isinstance(change, dict):
            raise ConfigError(f"--set {key}.{name}=... must name a key of it, e.g. {key}.{name}.weight=0.5")
        i = names.index(name)
        out[i] = merge(out[i], change)
    return out


def override_dict(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set` items as one nested dict (later items win)."""
    raw: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        parts = key.split(".")
        if _expects_text(parts) and not isinstance(value, str):
            value = item.split("=", 1)[1].strip()  # e.g. data.corpus=2024 is a path, not a number
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        raw = merge(raw, nested)
    return raw


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Build a type- and value-checked `Config`: defaults < base < preset < file < `--set` overrides.
    Each layer's flat model keys are nested before the layers merge, so a later layer's flat key
    overrides an earlier one's table key and the other way round."""
    raw: dict[str, Any] = nest_aliases(dict(base or {}))
    if preset:
        raw = merge(raw, nest_aliases(preset_dict(preset)))
    if config_file:
        raw = merge(raw, nest_aliases(file_dict(config_file)))
    return from_dict(merge(raw, nest_aliases(override_dict(overrides))))


def coerce(key: str, value: Any, kind: Any) -> Any:
    """`value` as type `kind` (bool, int, float, str, list[...]), or a ConfigError naming `key`."""
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):  # a table inside a section: [model.moe]
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a table ([{key}]) of keys, got {value!r}")
        return build_dataclass(kind, value, key)
    if origin is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
        return _table_list(key, value, typing.get_args(kind)[0])
    if origin is dict:
        _, inner = typing.get_args(kind)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of name = value, got {value!r}")
        return {str(k): coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    if origin is list:
        (inner,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(key, v, inner) for v in value]
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


def _table_list(key: str, value: Any, cls: type) -> list[Any]:
    """An array of tables (`[[data.sources]]`), each built as `cls` and named in errors by its
    `name` key where it has one."""
    if isinstance(value, dict):
        raise ConfigError(
            f"{key} is a list of [[{key}]] tables; `--set {key}.<name>.<key>=...` changes one the config defines"
        )
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key} must be a list of [[{key}]] tables, got {value!r}")
    out = []
    for i, table in enumerate(value):
        label = f"{key}.{table['name']}" if isinstance(table.get("name"), str) and table["name"] else f"{key}[{i}]"
        shared = sorted(set(table) & {"tokenizer", "vocab_size"}) if cls is SourceConfig else []
        if shared:
            raise ConfigError(
                f"{label}.{shared[0]}: the sources of a mixture share one tokenizer; set data.{shared[0]} "
                "(or leave data.tokenizer empty: one is trained on a weighted sample of every source)"
            )
        out.append(build_dataclass(cls, table, label))
    return out


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """An instance of dataclass `cls` from a table, every value coerced to its field's type;
    unknown keys are errors naming the closest allowed one."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if name not in hints:
            allowed = [*hints, *(MODEL_ALIASES if cls is ModelConfig else ())]
            raise ConfigError(_unknown(key, "key", [f"{prefix}.{k}" for k in allowed]))
        kwargs[name] = coerce(key, value, hints[name])
    return cls(**kwargs)


def _nested_section(section: str, values: dict[str, Any]) -> Any:
    """A section holding plain keys plus `[section.<name>]` option tables (kept raw here; their
    owners check them once the registries are loaded)."""
    cls = cast(type, {f.name: f.default_factory for f in dataclasses.fields(Config)}[section])  # a section dataclass
    slot = NESTED_SECTIONS[section]
    plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
    tables = {k: dict(v) for k, v in values.items() if isinstance(v, dict)}
    if slot in plain:
        raise ConfigError(f"{section}.{slot} is not a key; give options as [{section}.<name>] tables")
    built = build_dataclass(cls, plain, section)
    setattr(built, slot, tables)
    return built


def from_dict(raw: dict[str, Any]) -> Config:
    """A checked `Config` from nested plain data (a TOML file's shape, flat model keys allowed)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built: dict[str, Any] = {}
    for section, values in nest_aliases(raw).items():
        if section not in sections:
            raise ConfigError(_unknown(section, "section", list(sections)))
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        if section in NESTED_SECTIONS:
            built[section] = _nested_section(section, values)
            continue
        cls = cast(type, sections[section].default_factory)
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if isinstance(value, dict) and not dataclasses.is_dataclass(hints.get(name)):
                raise ConfigError(f"{section}.{name} must be a value, not a table")
        built[section] = build_dataclass(cls, values, section)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _unknown(name: str, what: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
    return f"unknown config {what} '{name}'{hint}"


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain data, in the shape the TOML files have (option tables nested
    inside their section)."""
    out = dataclasses.asdict(cfg)
    for section, slot in NESTED_SECTIONS.items():
        tables = out[section].pop(slot)
        out[section].update(tables)
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """`section.key` (and `section.name` for option tables) -> value; the model's family tables
    by their flat names (`model.moe_top_k`), as messages and `--set` spell them."""
    out: dict[str, Any] = {}
    for s, sec in to_dict(cfg).items():
        out.update(flat_model_keys(sec) if s == "model" else {f"{s}.{k}": v for k, v in sec.items()})
    return out


def validate(cfg: Config) -> None:
    """Types are checked on construction; this checks values and how sections fit together.
    What depends on the model family lives in its ModelSpec (`kiln.train.resolve`)."""
    flat = flatten(cfg)
    for key, allowed in CHOICES.items():
        _require(flat[key] in allowed, f"{key} = {flat[key]!r} is not allowed; choose one of {', '.join(allowed)}")
    validate_ranges(flat)
    validate_relations(cfg)
    validate_sections(cfg)


def to_toml(cfg: Config | dict[str, Any]) -> str:
    """The config (or its dict) as TOML text (kiln.tomlwrite)."""
    from kiln.tomlwrite import toml_text

    return toml_text(to_dict(cfg) if isinstance(cfg, Config) else cfg)
