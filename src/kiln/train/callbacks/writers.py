"""Metric writers for dashboards: `tensorboard` (event files under the run folder) and `wandb`
(Weights & Biases, offline by default: no network, sync later with `wandb sync`). Both write
the same numbers as metrics.jsonl and eval.jsonl, from rank 0. Optional extras:
`pip install 'kiln[tensorboard]'`, `pip install 'kiln[wandb]'`."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any

from kiln.errors import ConfigError
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from wandb.sdk.wandb_run import Run


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, Real) and not isinstance(v, bool) and k != "step"}


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"callback '{extra}' needs the {module} package: pip install 'kiln[{extra}]'")


@dataclass
class TensorBoardOptions:
    log_dir: str = ""  # default: <run>/tensorboard

    def check(self) -> None:
        _require("tensorboard", "tensorboard")


class TensorBoardWriter(Callback):
    name = "tensorboard"
    Options = TensorBoardOptions

    def __init__(self, options: TensorBoardOptions | None = None):
        super().__init__(options or TensorBoardOptions())
        self.writer: SummaryWriter | None = None

    def on_run_start(self, trainer: RunView) -> None:
        if not trainer.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            self.options.log_dir or str(trainer.run.path / "tensorboard"),
            purge_step=trainer.step + 1 if trainer.step else None,
        )

    def on_log(self, trainer: RunView, record: dict[str, Any]) -> None:
        if self.writer is not None:
            for k, v in _numbers(record).items():
                self.writer.add_scalar(f"train/{k}", v, record["step"])

    def on_eval(self, trainer: RunView, record: dict[str, Any]) -> None:
        if self.writer is not None:
            for k, v in _numbers(record).items():
                self.writer.add_scalar(f"eval/{k}", v, record["step"])

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        self.on_error(trainer, None)

    def on_error(self, trainer: RunView, error: BaseException | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class WandbOptions:
    project: str = "kiln"
    entity: str = ""
    mode: str = "offline"  # offline (no network) | online | disabled

    def check(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"callbacks.wandb.mode = {self.mode!r}; choose offline, online or disabled")
        _require("wandb", "wandb")


class WandbWriter(Callback):
    name = "wandb"
    Options = WandbOptions

    def __init__(self, options: WandbOptions | None = None):
        super().__init__(options or WandbOptions())
        self.wandb_run: Run | None = None

    def on_run_start(self, trainer: RunView) -> None:
        if not trainer.is_main:
            return
        import wandb

        from kiln.config import to_dict

        meta = trainer.run.meta()
        ident = hashlib.sha1(f"{trainer.run.path.resolve()}:{meta.get('created', '')}".encode()).hexdigest()[:16]
        self.wandb_run = wandb.init(
            project=self.options.project,
            entity=self.options.entity or None,
            name=trainer.run.name,
            id=ident,
            resume="allow",
            mode=self.options.mode,
            dir=str(trainer.run.path),
            config=to_dict(trainer.cfg),
        )

    def on_log(self, trainer: RunView, record: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in _numbers(record).items()}, step=record["step"])

    def on_eval(self, trainer: RunView, record: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log({f"eval/{k}": v for k, v in _numbers(record).items()}, step=record["step"])

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(_numbers(summary))
            self.wandb_run.finish()
            self.wandb_run = None

    def on_error(self, trainer: RunView, error: BaseException) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None
