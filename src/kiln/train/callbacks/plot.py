"""loss.png at the end of a run, drawn from the run folder's own records (so a resumed run's
plot covers the whole run)."""

from __future__ import annotations

from typing import Any

from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView, loop_view


class LossPlot(Callback):
    name = "plot"

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        if trainer.is_main:
            from kiln.runs.report import plot_losses

            plot_losses(trainer.run, loop_view(trainer).data.manifest["val_unigram_entropy"])
