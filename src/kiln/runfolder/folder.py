"""The run directory: everything one experiment wrote, in one place, read and written only here.

    runs/<name>/
        run.json            what started the run: created, kiln version, launcher id, plugins
        config.toml         the resolved configuration
        tokenizer.json      the tokenizer the run's data was made with
        metrics.jsonl       one JSON object per logged training step
        .metrics-cache/     a columnar copy of a long metrics.jsonl, rebuilt at will (kiln.runfolder.column_cache)
        eval.jsonl          one JSON object per evaluation
        events.jsonl        what the guard saw and did, failed checkpoint writes, budget decisions
        *.jsonl             other step-keyed logs written by callbacks (layer_stats.jsonl, ...)
        eval/step-<N>.json  evaluation suites at step N (and eval/step-<N>/ their artifacts)
        samples.txt         generations from the fixed prompts at the end
        summary.json        final figures
        status.json         created / running (pid, host, heartbeat) / finished / failed / stopped / interrupted
        lineage.json        a fork's parent run, fork step, checkpoint hash and changes (kiln.runs.fork)
        loss.png            training and validation loss curves
        checkpoints/        see kiln.train.checkpoint

Every JSONL file in the folder is step-keyed (each record has a "step"), so `truncate_after`
can make the folder what it was at any checkpoint. Training writes the folder through `RunFolder`;
the run tools read it through its subclass `kiln.runs.rundir.RunDir`, which adds the checkpoints
and the model at any step.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from kiln.config import Config, file_dict, from_dict, to_toml
from kiln.errors import KilnError
from kiln.fileio import write_atomic
from kiln.version import __version__

if TYPE_CHECKING:
    from kiln.runfolder.columns import Table


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.toml")
    meta_path = property(lambda self: self.path / "run.json")
    tokenizer_path = property(lambda self: self.path / "tokenizer.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    eval_path = property(lambda self: self.path / "eval.jsonl")
    events_path = property(lambda self: self.path / "events.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    samples_path = property(lambda self: self.path / "samples.txt")
    status_path = property(lambda self: self.path / "status.json")
    lineage_path = property(lambda self: self.path / "lineage.json")
    eval_dir = property(lambda self: self.path / "eval")
    checkpoints = property(lambda self: self.path / "checkpoints")

    # ------------------------------------------------------------------ creating, opening
    @staticmethod
    def check_new(runs_dir: Path, name: str) -> None:
        """Refuse a run name that is taken, before any work towards creating it."""
        path = Path(runs_dir) / name
        if path.exists():
            raise KilnError(f"run '{path}' already exists; resume it with --resume {path} or choose another --name")

    @classmethod
    def create(cls, runs_dir: Path, name: str, cfg: Config, meta: dict[str, Any] | None = None) -> Self:
        """A new run folder; an existing run is never overwritten."""
        path = Path(runs_dir) / name
        cls.check_new(runs_dir, name)
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise KilnError(
                f"cannot create the run folder '{path}' ({e.strerror}); choose a writable --runs-dir"
            ) from None
        run = cls(path)
        run.write_json(
            "run.json",
            {
                "name": name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "kiln_version": __version__,
                **(meta or {}),
            },
        )
        run.write_config(cfg)
        run.write_json("status.json", {"state": "created"})
        return run

    @classmethod
    def open(cls, path: Path) -> Self:
        run = cls(path)
        if not run.config_path.is_file():
            raise KilnError(f"'{path}' is not a Kiln run folder (no config.toml)")
        return run

    @classmethod
    def find(cls, runs_dir: Path, **meta: Any) -> Self | None:
        """The run under `runs_dir` whose run.json holds all of `meta` (e.g. a launcher's job id)."""
        folder = Path(runs_dir)
        if not folder.is_dir():
            return None
        for path in sorted(folder.iterdir()):
            if (path / "config.toml").is_file():
                found = cls(path).meta()
                if all(found.get(k) == v for k, v in meta.items()):
                    return cls(path)
        return None

    @property
    def name(self) -> str:
        return self.path.name

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------ writing
    def write_text(self, name: str, text: str) -> None:
        """Write a file atomically: readers see the old or the new content, never a mix."""
        write_atomic(self.path / name, text)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def write_config(self, cfg: Config) -> None:
        self.write_text("config.toml", to_toml(cfg))

    def append(self, name: str | Path, record: dict[str, Any]) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.append(self.metrics_path.name, record)

    def log_eval(self, record: dict[str, Any]) -> None:
        self.append(self.eval_path.name, record)

    def log_event(self, record: dict[str, Any]) -> None:
        self.append(self.events_path.name, record)

    # ------------------------------------------------------------------ reading
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

    def metrics_table(self) -> Table:
        """metrics.jsonl by column (kiln.runfolder.columns), through its columnar copy when long: what
        reads every logged step of a long run."""
        from kiln.runfolder.column_cache import read_table

        return read_table(self.metrics_path)

    def evals_table(self) -> Table:
        from kiln.runfolder.column_cache import read_table

        return read_table(self.eval_path)

    def last_metrics(self) -> dict[str, Any]:
        """The last record of metrics.jsonl ({} without one), read from the file's end."""
        from kiln.runfolder.jsonl_tail import last_record

        return last_record(self.metrics_path) or {}

    def events(self) -> list[dict[str, Any]]:
        return self.read_jsonl(self.events_path)

    def summary(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            return None

    def lineage(self) -> dict[str, Any] | None:
        """What this run was forked from (None for a run started afresh); see kiln.runs.fork."""
        try:
            return json.loads(self.lineage_path.read_text())
        except (OSError, ValueError):
            return None

    def parent(self) -> tuple[Self, int] | None:
        """The run this one was forked from and the step it was forked at (0 for --from-scratch),
        found next to this run first (run folders move together), else where it was."""
        lineage = self.lineage()
        if not lineage:
            return None
        parent = lineage["parent"]
        for candidate in (self.path.parent / parent["run"], Path(parent.get("path", ""))):
            if (candidate / "config.toml").is_file() and candidate.resolve() != self.path.resolve():
                return type(self)(candidate), (0 if lineage.get("from_scratch") else int(parent["step"]))
        return None

    def ancestry(self) -> list[tuple[Self, int]]:
        """Every ancestor with the step up to which its records lead to this run, oldest first
        (a fork's curve is its parent's up to the fork step, then its own)."""
        chain: list[tuple[Self, int]] = []
        seen = {self.path.resolve()}
        current = self.parent()
        while current is not None and current[0].path.resolve() not in seen:
            chain.append(current)
            seen.add(current[0].path.resolve())
            current = current[0].parent()
        chain.reverse()
        return chain

    def status(self) -> dict[str, Any]:
        """The run's state, with a "running" that no live process backs up read as "interrupted"."""
        from kiln.runfolder.status import resolve_status

        try:
            saved = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            saved = {"state": "finished" if self.summary_path.is_file() else "interrupted"}
        return resolve_status(saved)

    def config_dict(self) -> dict[str, Any]:
        return file_dict(self.config_path)

    def config(self) -> Config:
        """The run's configuration (types and values checked; names resolve in kiln.train.resolve)."""
        return from_dict(self.config_dict())

    def tokenizer(self):
        from kiln.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    # ------------------------------------------------------------------ forgetting
    def step_logs(self) -> list[Path]:
        return sorted(p for p in self.path.glob("*.jsonl") if p.is_file())

    def truncate_after(self, step: int, keep: tuple[str, ...] = ()) -> None:
        """Forget everything written after `step` (when a run resumes or rolls back to the
        checkpoint of `step`): records of every step-keyed log, and evaluation reports of later
        steps. Files named in `keep` stay whole (a rollback keeps the guard's events)."""
        for path in self.step_logs():
            if path.name in keep:
                continue
            kept = [r for r in self.read_jsonl(path) if r.get("step", 0) <= step]  # also drops a torn last line
            self.write_text(path.name, "".join(json.dumps(r) + "\n" for r in kept))
        if self.eval_dir.is_dir():
            for entry in self.eval_dir.iterdir():
                n = entry.name.removesuffix(".json")
                if n.startswith("step-") and n[5:].isdigit() and int(n[5:]) > step:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def check_family(self, cfg: Config, check: Callable[[Config], Any]) -> Any:
        """`check(cfg)`, with a hint naming the plugins the run was trained with when a name
        it needs is not registered in this process."""
        try:
            return check(cfg)
        except KilnError as e:
            plugins = self.meta().get("plugins") or []
            if plugins and "registered" in str(e):
                raise type(e)(f"{e}; this run was trained with --plugin {' --plugin '.join(plugins)}") from None
            raise
