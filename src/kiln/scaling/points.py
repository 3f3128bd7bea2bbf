"""Where scaling points come from: finished Kiln runs, or a CSV of (params, tokens, loss).

From a run: N is the model's non-embedding parameter count, D the tokens it trained on, C the
training compute with the same FLOP accounting as MFU (the family's FLOPs per token x D), and
the loss its final validation loss. Runs must be comparable: one tokenizer, one objective, one
corpus; unfinished runs are refused by name.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from kiln.errors import ConfigError
from kiln.scaling.law import Point

CSV_COLUMNS = ("params", "tokens", "loss")
EMBEDDINGS = ("tok_emb.weight", "pos_emb.weight", "type_emb.weight", "head.weight")  # not counted in N (Kaplan et al.)


def points_from_csv(path: Path) -> list[Point]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--points {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"{path} lacks the column(s) {', '.join(missing)}; the header must name "
                f"{', '.join(CSV_COLUMNS)} (and optionally flops)"
            )
        points = []
        for line, row in enumerate(reader, start=2):
            try:
                values = [float(row[c]) for c in CSV_COLUMNS]
                flops = float(row["flops"]) if row.get("flops") not in (None, "") else 0.0
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{path} line {line}: params, tokens and loss must be numbers, got "
                    f"{[row.get(c) for c in CSV_COLUMNS]}"
                ) from None
            if not all(v > 0 for v in values) or flops < 0:
                raise ConfigError(f"{path} line {line}: params, tokens and loss must be positive, got {values}")
            params, tokens, loss = values  # CSV_COLUMNS
            points.append(Point(params, tokens, loss, flops=flops, name=f"line {line}"))
    return points


def non_embedding_params(cfg, vocab_size: int) -> int:
    from kiln.model.registry import build_model

    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    return sum(p.numel() for name, p in model.named_parameters() if name not in EMBEDDINGS)


def points_from_runs(paths: list[Path]) -> list[Point]:
    from kiln.runfolder.folder import RunFolder
    from kiln.scaling.flops import flops_per_token

    expanded: list[Path] = []
    for p in map(Path, paths):  # a sweep's folder stands for the runs in it
        children = (
            sorted(c for c in p.iterdir() if (c / "config.toml").is_file())
            if p.is_dir() and not (p / "config.toml").is_file()
            else []
        )
        expanded += children or [p]
    runs = [RunFolder.open(p) for p in expanded]
    unfinished = [r.name for r in runs if r.status().get("state") != "finished" or not (r.summary() or {})]
    if unfinished:
        raise ConfigError(
            f"unfinished run(s): {', '.join(unfinished)}; finish them (kiln train --resume) or leave them out"
        )
    kinds: dict[str, dict[str, list[str]]] = {"tokenizer": {}, "objective": {}, "corpus": {}}
    points = []
    for run in runs:
        cfg, summary = run.config(), run.summary()
        assert summary is not None  # every run here is finished (checked above), with a summary
        kinds["tokenizer"].setdefault(run.tokenizer().sha256[:12], []).append(run.name)
        kinds["objective"].setdefault(cfg.train.objective, []).append(run.name)
        kinds["corpus"].setdefault(cfg.data.corpus, []).append(run.name)
        loss = summary.get("val_loss")
        if loss is None:
            raise ConfigError(f"run {run.name} has no final validation loss in summary.json (eval.batches = 0?)")
        vocab = run.tokenizer().vocab_size
        tokens = float(summary["tokens"])
        points.append(
            Point(
                params=float(non_embedding_params(cfg.model, vocab)),
                tokens=tokens,
                loss=float(loss),
                flops=flops_per_token(cfg.model, vocab) * tokens,
                name=run.name,
            )
        )
    for kind, groups in kinds.items():
        if len(groups) > 1:
            listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
            plural = {"tokenizer": "tokenizers", "objective": "objectives", "corpus": "corpora"}[kind]
            raise ConfigError(
                f"the runs mix {plural} ({listing}); a scaling law compares runs that differ only in size and tokens"
            )
    return points
