"""The run directory: everything one experiment wrote, in one place.

    runs/<name>/
        config.toml       the resolved configuration
        metrics.jsonl     one JSON object per logged training step
        eval.jsonl        one JSON object per evaluation
        samples.txt       generations from the fixed prompts at the end
        summary.json      final figures
        loss.png          training and validation loss curves
        checkpoints/      see kiln.train.checkpoint
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kiln.config import Config, to_toml
from kiln.errors import KilnError


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.toml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    eval_path = property(lambda self: self.path / "eval.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    samples_path = property(lambda self: self.path / "samples.txt")
    checkpoints = property(lambda self: self.path / "checkpoints")

    @classmethod
    def create(cls, runs_dir: Path, name: str, cfg: Config) -> "RunDir":
        """A new run folder; an existing run is never overwritten."""
        path = Path(runs_dir) / name
        if path.exists():
            raise KilnError(f"run '{path}' already exists; resume it with --resume {path} or choose another --name")
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise KilnError(f"cannot create the run folder '{path}' ({e.strerror}); choose a writable --runs-dir") from None
        run = cls(path)
        run.write_text("config.toml", to_toml(cfg))
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        run = cls(path)
        if not run.config_path.is_file():
            raise KilnError(f"'{path}' is not a Kiln run folder (no config.toml)")
        return run

    def write_text(self, name: str, text: str) -> None:
        """Write a file atomically: readers see the old or the new content, never a mix."""
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def append(self, path: Path, record: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.append(self.metrics_path, record)

    def log_eval(self, record: dict[str, Any]) -> None:
        self.append(self.eval_path, record)

    @staticmethod
    def read_jsonl(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a line cut short by a kill: everything after it is gone too
        return out

    def metrics(self) -> list[dict[str, Any]]:
        return self.read_jsonl(self.metrics_path)

    def evals(self) -> list[dict[str, Any]]:
        return self.read_jsonl(self.eval_path)

    def truncate_after(self, step: int) -> None:
        """Forget records past `step` (written after the checkpoint a resume starts from)."""
        for path in (self.metrics_path, self.eval_path):
            if path.is_file():
                kept = [r for r in self.read_jsonl(path) if r.get("step", 0) <= step]
                self.write_text(path.name, "".join(json.dumps(r) + "\n" for r in kept))
