"""The doctor's rule for the run's data: the run's tokenizer.json against the tokenizer its
prepared dataset was made with (found in the data cache through the checkpoints' content key)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from kiln.runs.doctor.context import Context
from kiln.runs.doctor.findings import finding
from kiln.train import checkpoint as ckpt


def dataset_folder(ctx: Context) -> Path | None:
    """The prepared dataset the run trained on: the one whose content key its checkpoints name,
    else the one its data config maps to; None when it is not in the cache."""
    if ctx.cfg is None:
        return None
    raw = Path(ctx.cfg.data.cache_dir).expanduser()
    caches = [
        c
        for c in ([raw] if raw.is_absolute() else [raw, ctx.run.path.parent / raw, ctx.run.path.parent.parent / raw])
        if c.is_dir()
    ]
    keys: set[str] = set()
    for path in ctx.checkpoints():
        try:
            keys.add(ckpt.read_state(path)["trainer"]["data_key"])
        except (OSError, ValueError, KeyError):
            pass
    for folder in (f for cache in caches for f in sorted(cache.iterdir())):
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if keys & {manifest.get("content_key"), manifest.get("key")}:
            return folder
    try:
        from kiln.data.corpora import resolve_corpus
        from kiln.data.shards import dataset_key

        key = dataset_key(ctx.cfg.data, resolve_corpus(ctx.cfg.data))
    except Exception:  # the corpus or the tokenizer file is not here: nothing to compare with
        return None
    return next((c / key for c in caches if (c / key / "manifest.json").is_file()), None)


def tokenizer_mismatch(ctx: Context) -> list[dict[str, Any]]:
    """RUN/tokenizer.json against the tokenizer_sha256 of the dataset's manifest (skipped when the
    dataset is not in the cache)."""
    folder = dataset_folder(ctx) if ctx.run.tokenizer_path.is_file() else None
    if folder is None:
        return []
    from kiln.data.tokenizer import load_tokenizer

    expected = json.loads((folder / "manifest.json").read_text()).get("tokenizer_sha256") or ""
    try:
        actual = load_tokenizer(ctx.run.tokenizer_path).sha256
    except Exception as e:  # an unreadable tokenizer.json is a mismatch too
        actual = f"unreadable ({type(e).__name__})"
    if actual == expected:
        return []
    remedy = None
    try:
        if load_tokenizer(folder / "tokenizer.json").sha256 == expected:
            argv = ["cp", str(folder / "tokenizer.json"), str(ctx.run.tokenizer_path)]
            remedy = {
                "command": shlex.join(argv),
                "argv": argv,
                "kiln": False,
                "why": "puts back the tokenizer the shards (and so the model) were made with",
            }
    except Exception:  # the dataset's own tokenizer is unreadable too: report without a remedy
        remedy = None
    return [
        finding(
            "tokenizer_mismatch",
            "critical",
            (0, ctx.last_step or 0),
            {"run_tokenizer_sha256": actual[:16], "dataset_tokenizer_sha256": expected[:16], "dataset": str(folder)},
            f"{ctx.run.tokenizer_path.name} is not the tokenizer of the run's prepared data ({folder.name}): "
            "token ids mean other tokens, so sampling, evaluation and resuming read the model wrongly",
            remedy,
        )
    ]
