"""`kiln export --format hf` and `kiln import`: whole runs to and from Hugging Face folders.

Every refusal happens before anything is written (the mapping is checked first), and both
directions write atomically: an export folder appears complete or not at all, an import's run
folder is removed again if any step of making it fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kiln.config import ModelConfig, load_config
from kiln.data.tokenizer import KilnTokenizer
from kiln.errors import ConfigError
from kiln.interop import hf_files
from kiln.interop.adapters import spec_adapter
from kiln.interop.hf import VOCAB_TENSORS, HFAdapter
from kiln.model.init import assign_full_weights
from kiln.model.registry import MODEL_SPECS, build_model, get_spec
from kiln.runs.rundir import RunDir

DEFAULT_MAX_SHARD = "5GB"
INIT_WEIGHTS = "imported.safetensors"  # the imported weights, in Kiln's names, inside the run folder


def _special_ids(tokenizer: KilnTokenizer) -> dict[str, int | None]:
    return {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}


def generation_config(tokenizer: KilnTokenizer) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": False,
    }


def adapter_for(cfg: ModelConfig) -> HFAdapter:
    """The Hugging Face adapter of the config's model family (its `ModelSpec.hf_adapter`)."""
    adapter = spec_adapter(get_spec(cfg.family))
    if adapter is None:
        raise ConfigError(
            f"model.family = '{cfg.family}' has no Hugging Face mapping yet; export it with --format safetensors"
        )
    return adapter


def adapter_for_type(model_type: Any) -> HFAdapter:
    """The adapter of the family that imports config.json's `model_type`."""
    adapters = [adapter for spec in MODEL_SPECS.values() if (adapter := spec_adapter(spec)) is not None]
    for adapter in adapters:
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for adapter in adapters for t in adapter.model_types)
    raise ConfigError(f"model_type = {model_type!r} is not a family Kiln imports; supported: {', '.join(known)}")


def export_hf(
    path: Path,
    out: Path,
    step: int | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD,
    warn: Callable[[str], None] = print,
) -> tuple[Path, int]:
    """The run's model at `step` (either checkpoint format; default the newest, or step 0 for a run
    with none) as a folder AutoModelForCausalLM and AutoTokenizer load with no extra code; the folder
    and the step it holds."""
    run = RunDir.open(path)
    cfg = run.config()
    adapter = adapter_for(cfg.model)
    adapter.flavour(cfg.model)  # refuse before loading anything
    max_bytes = hf_files.parse_size(max_shard_size)
    if Path(out).exists():
        raise ConfigError(f"--out {out} already exists; choose a new folder (Kiln never overwrites an export)")
    loaded = run.load_model(step, device=torch.device("cpu"), warn=warn)
    tokenizer = loaded.tokenizer
    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    tensors = adapter.to_hf(cfg.model, state, tokenizer.vocab_size)
    files = {
        "config.json": adapter.config(cfg.model, tokenizer.vocab_size, _special_ids(tokenizer)),
        "generation_config.json": generation_config(tokenizer),
    }
    written = hf_files.write_folder(Path(out), files, tensors, tokenizer, cfg.model.positions, max_bytes)
    return written, loaded.step


def read_hf(folder: Path) -> tuple[ModelConfig, KilnTokenizer, dict[str, torch.Tensor]]:
    """A Llama, Qwen3, GPT-2 or BERT folder as (Kiln model config, tokenizer, Kiln-named weights with
    the tokenizer's vocabulary)."""
    folder = Path(folder)
    config = hf_files.read_config(folder)
    adapter = adapter_for_type(config.get("model_type"))
    model_cfg = adapter.model_config(config)
    tokenizer = hf_files.read_tokenizer(folder, config)
    state = adapter.from_hf(model_cfg, hf_files.read_weights(folder))
    rows, vocab = state["tok_emb.weight"].shape[0], tokenizer.vocab_size
    if rows < vocab:
        raise ConfigError(
            f"{folder}: the embedding has {rows} rows but the tokenizer {vocab} tokens; they must belong together"
        )
    for name in VOCAB_TENSORS:  # rows past the tokenizer are the exporter's padding: no token reaches them
        if name in state:
            state[name] = state[name][:vocab].contiguous()
    return model_cfg, tokenizer, state


def import_hf(folder: Path, runs_dir: Path, name: str) -> Path:
    """A new run `runs_dir/name` holding the folder's model and tokenizer, ready for
    `kiln train --resume RUN --set data.corpus=... --set train.steps=...`."""
    model_cfg, tokenizer, state = read_hf(folder)
    target = Path(runs_dir) / name
    cfg = load_config(
        base={
            "model": {**asdict(model_cfg), "init_from": str((target / INIT_WEIGHTS).resolve())},
            "data": {"tokenizer": str((target / "tokenizer.json").resolve()), "vocab_size": tokenizer.vocab_size},
        }
    )
    run = RunDir.create(runs_dir, name, cfg, {"imported_from": str(Path(folder).resolve())})
    try:
        tokenizer.save(run.tokenizer_path)
        save_file(state, run.path / INIT_WEIGHTS, metadata={"format": "pt"})
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)
        raise
    return run.path


class LanguageModel(nn.Module):
    """A Kiln model seen from a notebook: `model(ids)` gives float32 logits over the true
    vocabulary (Kiln's padding rows are cut off, so no probability lands on them)."""

    def __init__(self, model: nn.Module, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.model, self.vocab_size, self.cfg = model.eval(), vocab_size, cfg

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)[..., : self.vocab_size].float()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of `ids` (B, T): full-sequence forwards, no KV cache."""
        context = self.cfg.positions
        for _ in range(max_new_tokens):
            nxt = self(ids[:, -context:])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def load(path: str | Path, step: int | None = None) -> tuple[LanguageModel, KilnTokenizer]:
    """(model, tokenizer) from a Kiln run folder (its newest valid checkpoint, or `step`) or a
    Hugging Face Llama / Qwen3 / GPT-2 / BERT folder, in float32 on the CPU."""
    path = Path(path)
    if (path / "config.toml").is_file():
        loaded = RunDir.open(path).load_model(step, device=torch.device("cpu"), warn=lambda _: None)
        return LanguageModel(loaded.model.float(), loaded.tokenizer.vocab_size, loaded.cfg.model), loaded.tokenizer
    if (path / "config.json").is_file():
        if step is not None:
            raise ConfigError(f"{path} is a Hugging Face folder: it has one set of weights (drop step=)")
        model_cfg, tokenizer, state = read_hf(path)
        model = build_model(model_cfg, tokenizer.vocab_size)
        with torch.no_grad():
            _load_state(model, state)
        return LanguageModel(model.float(), tokenizer.vocab_size, model_cfg), tokenizer
    raise ConfigError(f"{path} is neither a Kiln run (config.toml) nor a Hugging Face folder (config.json)")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Kiln-named full weights (true vocabulary) into a built model, as `model.init_from` does."""
    assign_full_weights(model, state.get, "the Hugging Face folder")
    init_buffers = getattr(model, "init_buffers", None)
    if init_buffers is not None:
        init_buffers()
