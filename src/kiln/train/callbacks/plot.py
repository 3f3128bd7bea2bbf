"""loss.png at the end of a run, drawn from the run folder's own records (so a resumed run's
plot covers the whole run)."""

from __future__ import annotations

from typing import Any

from kiln.runfolder.downsample import minmax
from kiln.runfolder.folder import RunFolder
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView, loop_view


class LossPlot(Callback):
    name = "plot"

    def on_run_end(self, trainer: RunView, summary: dict[str, Any]) -> None:
        if trainer.is_main:
            plot_losses(trainer.run, loop_view(trainer).data.manifest["val_unigram_entropy"])


def plot_losses(run: RunFolder, unigram_entropy: float | None = None) -> None:
    """loss.png: training loss per logged step, validation loss per evaluation, and the loss of
    a context-free (unigram) model for reference, from the run's own records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, evals = run.metrics_table(), run.evals()
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = metrics.is_number("step") & metrics.is_number("loss")
    steps, losses = minmax(metrics.numbers("step")[rows], metrics.numbers("loss")[rows], 700)  # a long run's too
    ax.plot(steps, losses, label="train", lw=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, ls="--", color="grey", lw=1, label="unigram entropy (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.path.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.path / "loss.png", dpi=100)
    plt.close(fig)
