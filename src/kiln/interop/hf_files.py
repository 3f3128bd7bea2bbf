"""Hugging Face model folders on disk: sharded safetensors with their index, tokenizer files with
the special-token roles, config.json and generation_config.json. No `transformers` needed.

Writes go to a temporary sibling folder that replaces nothing until it is complete: a failed
export leaves no half-written folder, and an existing output folder is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from kiln.data.tokenizer import ROLES, KilnTokenizer, tokenizer_from_json
from kiln.errors import ConfigError

INDEX = "model.safetensors.index.json"
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'5GB', '200MB', '1.5GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ConfigError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 200MB or 1GiB")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r} must be positive")
    return size


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in name order, cut into files of at most `max_bytes` (a tensor larger than that
    gets a file of its own), as `transformers`' save_pretrained does."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    return shards


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    parts = shard(tensors, max_bytes)
    if len(parts) == 1:
        save_file(parts[0], folder / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    weight_map = {}
    for name, part in zip(names, parts):
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model.safetensors or sharded files (through the index)."""
    if (folder / INDEX).is_file():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = "pytorch_model.bin" if (folder / "pytorch_model.bin").is_file() else "no weights"
        raise ConfigError(
            f"{folder} has {found}: Kiln reads only safetensors weights (never pickles); save the "
            "model with save_pretrained(..., safe_serialization=True)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


# ----------------------------------------------------------------------------- tokenizer
def write_tokenizer(folder: Path, tokenizer: KilnTokenizer, context: int) -> None:
    """tokenizer.json plus the files AutoTokenizer reads to build a PreTrainedTokenizerFast with
    every special-token role set."""
    (folder / "tokenizer.json").write_text(tokenizer.to_json())
    roles = {f"{r}_token": t for r, t in tokenizer.roles.items() if t is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "add_bos_token": False,
        "add_eos_token": False,
        **roles,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(roles, indent=2))


def _token(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(folder: Path, config: dict[str, Any]) -> KilnTokenizer:
    """The folder's tokenizer.json with its special tokens mapped to Kiln's roles. A role the
    tokenizer files do not name falls back to the token config.json gives its id (bos / eos /
    pad), then to eos (GPT-2's <|endoftext|> is bos, eos, pad and unk at once)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no tokenizer.json; save the tokenizer as a fast tokenizer "
            "(tokenizer.save_pretrained with a PreTrainedTokenizerFast)"
        )
    text = path.read_text()
    named: dict[str, str | None] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / file).is_file():
            data = json.loads((folder / file).read_text())
            for role in ROLES:
                if not named.get(role):  # the first file that names a role decides it
                    named[role] = _token(data.get(f"{role}_token"))
    for role, fallback in (("bos", "cls"), ("eos", "sep")):  # BERT names [CLS] and [SEP] instead
        if not named.get(role):
            for file in ("special_tokens_map.json", "tokenizer_config.json"):
                if (folder / file).is_file() and not named.get(role):
                    named[role] = _token(json.loads((folder / file).read_text()).get(f"{fallback}_token"))
    tok = Tokenizer.from_str(text)
    for role in ("bos", "eos", "pad"):
        if not named.get(role) and isinstance(config.get(f"{role}_token_id"), int):
            named[role] = tok.id_to_token(config[f"{role}_token_id"])
    eos = named.get("eos")
    if not eos:
        raise ConfigError(
            f"{folder}: no end-of-sequence token is named (eos_token in tokenizer_config.json or "
            "eos_token_id in config.json); Kiln separates documents with it"
        )
    roles = {r: named.get(r) or (eos if r != "mask" else None) for r in ROLES}
    return tokenizer_from_json(text, roles)


# ----------------------------------------------------------------------------- folders
def write_folder(
    out: Path,
    files: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    tokenizer: KilnTokenizer,
    context: int,
    max_bytes: int,
) -> Path:
    """A complete HF folder at `out` (which must not exist), written atomically."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} already exists; choose a new folder (Kiln never overwrites an export)")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        write_weights(tmp, tensors, max_bytes)
        write_tokenizer(tmp, tokenizer, context)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
