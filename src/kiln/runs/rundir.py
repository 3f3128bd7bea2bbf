"""`RunDir`: a run folder (kiln.runfolder.folder.RunFolder) as the run tools read it, with its
checkpoints and the model at any step, whatever layout saved it, without the trainer. Training
writes run folders through `RunFolder` and never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.config import Config
from kiln.errors import CheckpointError
from kiln.runfolder.folder import RunFolder

if TYPE_CHECKING:  # torch and the checkpoint code load on first use: `kiln runs` needs neither
    import torch


@dataclass
class LoadedModel:
    """A run's whole model at one step, in this process, ready for evaluation."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any  # kiln.data.tokenizer.KilnTokenizer
    device: torch.device
    precision: str
    step: int
    untrained: bool = False  # step 0 rebuilt as training starts it (no step-0 checkpoint)

    @property
    def autocast(self):
        from kiln.train.precision import autocast_for

        return autocast_for(self.device, self.precision)


class RunDir(RunFolder):
    # ------------------------------------------------------------------ checkpoints
    def checkpoint_paths(self) -> list[Path]:
        """Committed checkpoint folders, oldest first."""
        from kiln.train import checkpoint as ckpt

        return ckpt.list_checkpoints(self.checkpoints)

    def latest_checkpoint(self, warn: Callable[[str], None] = print, max_step: int | None = None) -> Path | None:
        """The newest checkpoint (at most `max_step`) that verifies; corrupt ones are reported."""
        from kiln.train import checkpoint as ckpt

        return ckpt.latest_valid_checkpoint(self.checkpoints, warn=warn, max_step=max_step)

    def checkpoint(self, step: int | None = None, warn: Callable[[str], None] = print) -> Path:
        """Checkpoint `step` (verified), or the newest valid one; a CheckpointError otherwise."""
        from kiln.train import checkpoint as ckpt

        if step is None:
            chosen = self.latest_checkpoint(warn)
            if chosen is None:
                raise CheckpointError(f"{self.path} has no valid checkpoint to load")
            return chosen
        chosen = self.checkpoints / ckpt.step_dir_name(step)
        problem = ckpt.verify_checkpoint(chosen) if chosen.is_dir() else "it does not exist"
        if problem:
            steps = ", ".join(str(ckpt.checkpoint_step(p)) for p in self.checkpoint_paths()) or "none"
            raise CheckpointError(
                f"checkpoint step {step} of {self.path} is unusable: {problem} (checkpoints: {steps})"
            )
        return chosen

    def weights_at(self, step: int | None = None, warn: Callable[[str], None] = print) -> Path | None:
        """The checkpoint holding the model at `step` (default: the newest valid one), or None for the
        weights a run starts from (`model.init_from`'s, or drawn from train.seed): step 0 without a
        step-0 checkpoint, and the default of a run with no checkpoint at all (an import, say).
        A run whose checkpoints are all corrupt is an error, not a silent step 0."""
        from kiln.train import checkpoint as ckpt

        if step == 0 and not (self.checkpoints / ckpt.step_dir_name(0)).is_dir():
            return None
        if step is None and not self.checkpoint_paths():
            return None
        return self.checkpoint(step, warn)

    def starting_weights(self, cfg: Config) -> str:
        """What the weights at step 0 without a checkpoint are, for messages."""
        if self.meta().get("imported_from"):
            return "the imported weights"
        return "the weights of model.init_from" if cfg.model.init_from else "the initial weights, from train.seed"

    def load_model(
        self, step: int | None = None, device: torch.device | None = None, warn: Callable[[str], None] = print
    ) -> LoadedModel:
        """The whole model at `step` (default: the newest valid checkpoint, or step 0 for a run with
        none) in this process, whatever layout saved it. Step 0 without a step-0 checkpoint is the
        model training starts from, rebuilt exactly as training initialised it (from
        `model.init_from` or train.seed)."""
        from kiln.kernels import registry as kernels
        from kiln.model.registry import build_model, initialise, resolve_family
        from kiln.train import checkpoint as ckpt
        from kiln.train.precision import resolve_device, resolve_precision

        cfg = self.config()
        # evaluation may run elsewhere than training did: keep "torch" if chosen, else let "auto" pick
        kernels.set_backend("torch" if cfg.kernels.backend == "torch" else "auto")
        self.check_family(cfg, resolve_family)
        tokenizer = self.tokenizer()
        device = device or resolve_device(cfg)
        model = build_model(cfg.model, tokenizer.vocab_size).to(device)
        chosen = self.weights_at(step, warn)
        if chosen is None:
            if step is None:
                warn(f"{self.path.name} has no checkpoint yet: using step 0 ({self.starting_weights(cfg)})")
            initialise(model, cfg.model, cfg.train.seed)
            return LoadedModel(cfg, model.eval(), tokenizer, device, resolve_precision(cfg, device), 0, untrained=True)
        ckpt.load_weights(chosen, [model])
        precision = ckpt.read_state(chosen)["trainer"].get("precision") or resolve_precision(cfg, device)
        return LoadedModel(cfg, model.eval(), tokenizer, device, precision, ckpt.checkpoint_step(chosen))
