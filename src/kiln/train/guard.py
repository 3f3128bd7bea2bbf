"""The training guard: detect non-finite values, loss spikes and gradient-norm spikes, and act.

Detection runs on the device every step without a host sync. "Normal" is a rolling window of
healthy steps, described robustly in log space: the level is the median of the newest 10 (a
falling loss leaves an older median behind), the spread the median absolute deviation of
step-to-step changes (scaled to a standard deviation; a trend does not inflate it). A step is a
spike when its log value is more than `k` deviations above the level *and* at least
`min_loss_jump` (loss) or `min_grad_jump` (gradient norm) times it: late in training the window
is narrow, and a sigma test alone calls a 1.4x wiggle a spike (measured in bench/faults.py).
Two signals that agree need less of each: a loss jump of at least `min_loss_jump` counts with only
`k_corroborated` deviations when the same step's gradient norm is itself more than `k` deviations
and 2x above its level. A masked-LM step predicts few tokens, so its loss is noisy (a corrupted
batch reached 5.9 deviations in bench/faults.py while its gradient norm reached 8.3), whereas on
the 20 clean benchmark runs no step came within 1.12x of its level at any deviation.

Different evidence, different actions (defaults chosen by bench/faults.py):
    non-finite loss or gradient    on_nonfinite   skip the update (or rollback / stop)
    a loss spike                   on_spike       skip the update (or rollback / stop / ignore)
    `persist` loss spikes in a row on_persistent  rollback: the loss is not recovering
    a gradient-norm spike alone    on_grad_spike  record it and apply the update (or skip / ignore)

A fused optimizer skips a discarded update inside its kernel (the AMP grad scaler's `found_inf`
protocol), so nothing waits; other optimizers read the flag on the host. The host learns what
happened at the next logging sync, records every event in `events.jsonl`, and carries out the
action: `skip` (already done on the device), `record` (nothing to do), `rollback` (restore the
last good checkpoint and skip the batches from it to the spike plus a margin, optionally with a
lower learning rate for a while) or `stop`. Skipped batch ranges belong to the trainer's
checkpointed state (a fork may add some too), so a resumed run skips them as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from kiln.config import GuardConfig
from kiln.errors import KilnError

OK, NONFINITE, LOSS_SPIKE, GRAD_SPIKE, PERSISTENT = 0, 1, 2, 3, 4
KIND_NAMES = {
    NONFINITE: "nonfinite",
    LOSS_SPIKE: "loss_spike",
    GRAD_SPIKE: "grad_spike",
    PERSISTENT: "persistent_spike",
}
MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation of a normal distribution
RECENT = 10  # healthy steps whose median is the current level
CORROBORATING_GRAD_JUMP = 2.0  # a gradient norm this many times its level backs up a loss jump


class GuardStop(KilnError):
    """The guard stopped the run (configured `stop`, or too many interventions)."""


@dataclass
class GuardState:
    """What the guard must remember across checkpoints."""

    interventions: int = 0
    lr_factor: float = 1.0
    lr_factor_until: int = -1  # optimizer step before which lr_factor applies

    def to_dict(self) -> dict[str, Any]:
        return {
            "interventions": self.interventions,
            "lr_factor": self.lr_factor,
            "lr_factor_until": self.lr_factor_until,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GuardState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})  # older states held "skipped" too


class Guard:
    def __init__(self, cfg: GuardConfig, device: torch.device, state: GuardState | None = None, judge_from: int = 0):
        self.cfg = cfg
        self.judge_from = judge_from  # no spike verdicts before this step (the LR warmup is not stationary)
        self.device = device
        self.state = state or GuardState()
        self._reset_window()
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [kind, loss, grad_norm]) not yet seen by the host

    def _reset_window(self) -> None:
        w = self.cfg.window
        self.losses = torch.zeros(w, device=self.device, dtype=torch.float64)
        self.norms = torch.zeros(w, device=self.device, dtype=torch.float64)
        self.count = torch.zeros((), device=self.device, dtype=torch.int64)
        self.streak = torch.zeros((), device=self.device, dtype=torch.int64)
        self.grad_streak = torch.zeros((), device=self.device, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to judge and act exactly as an uninterrupted one."""
        return {
            **self.state.to_dict(),
            "window": {
                "scale": "log",
                "losses": self.losses.tolist(),
                "norms": self.norms.tolist(),
                "count": int(self.count),
                "streak": int(self.streak),
                "grad_streak": int(self.grad_streak),
            },
        }

    def load_state_dict(self, d: dict[str, Any] | None) -> None:
        if not d:
            return
        d = dict(d)
        window = d.pop("window", None)
        self.state = GuardState.from_dict(d)
        if window and len(window["losses"]) == self.cfg.window:
            to_log = (lambda t: t) if window.get("scale") == "log" else (lambda t: t.clamp(min=1e-30).log())
            self.losses = to_log(torch.tensor(window["losses"], device=self.device, dtype=torch.float64))
            self.norms = to_log(torch.tensor(window["norms"], device=self.device, dtype=torch.float64))
            self.count = torch.tensor(window["count"], device=self.device, dtype=torch.int64)
            self.streak = torch.tensor(window.get("streak", 0), device=self.device, dtype=torch.int64)
            self.grad_streak = torch.tensor(window.get("grad_streak", 0), device=self.device, dtype=torch.int64)

    def lr_scale(self, step: int) -> float:
        return self.state.lr_factor if step < self.state.lr_factor_until else 1.0

    def _deviation(
        self, history: torch.Tensor, value: torch.Tensor, n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log `value` minus the level, the spread) against the window's `n` newest healthy
        entries. The level is the median of the RECENT newest entries (a falling loss leaves the
        window's median behind); the spread is the MAD of step-to-step differences, which a trend
        does not inflate."""
        w = self.cfg.window
        ages = torch.arange(w, device=self.device)
        ordered = history[(self.count - 1 - ages) % w]  # newest first
        recent = torch.where(ages < torch.clamp(n, max=RECENT), ordered, torch.nan)
        steps = torch.where(ages[:-1] < n - 1, ordered[:-1] - ordered[1:], torch.nan)
        sigma = (steps - steps.nanmedian()).abs().nanmedian() * MAD_TO_SIGMA / math.sqrt(2.0)
        return value - recent.nanmedian(), sigma

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Classify this step on the device; returns a float flag (1 = discard the update)."""
        cfg = self.cfg
        loss, norm = loss.detach().double(), grad_norm.detach().double()
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        log_loss, log_norm = loss.clamp(min=1e-30).log(), norm.clamp(min=1e-30).log()
        n = self.count.clamp(max=cfg.window)
        ready = (n >= cfg.min_history) & (step >= self.judge_from)
        loss_x, loss_sigma = self._deviation(self.losses, log_loss, n)
        grad_x, grad_sigma = self._deviation(self.norms, log_norm, n)
        grad_far = grad_x > torch.clamp(cfg.k * grad_sigma, min=math.log(CORROBORATING_GRAD_JUMP))
        loss_needs = torch.where(grad_far, cfg.k_corroborated, cfg.k) * loss_sigma
        loss_spike = ready & finite & (loss_x > torch.clamp(loss_needs, min=math.log(cfg.min_loss_jump)))
        grad_spike = ready & finite & (grad_x > torch.clamp(cfg.k * grad_sigma, min=math.log(cfg.min_grad_jump)))
        if cfg.on_spike == "ignore":
            loss_spike = torch.zeros_like(loss_spike)
        if cfg.on_grad_spike == "ignore":
            grad_spike = torch.zeros_like(grad_spike)
        self.streak = torch.where(loss_spike, self.streak + 1, 0)
        self.grad_streak = torch.where(grad_spike & ~loss_spike, self.grad_streak + 1, 0)
        persistent = loss_spike & (self.streak >= cfg.persist)
        moved = persistent | (self.grad_streak >= cfg.persist)  # the gradient norm's level itself moved
        kind = torch.where(
            ~finite,
            NONFINITE,
            torch.where(
                persistent, PERSISTENT, torch.where(loss_spike, LOSS_SPIKE, torch.where(grad_spike, GRAD_SPIKE, OK))
            ),
        )
        good = kind == OK
        discard = ~good & ~((kind == GRAD_SPIKE) & (cfg.on_grad_spike != "skip"))
        # After `persist` loss spikes in a row the baseline restarts from the new level (if the
        # host does not roll back), instead of flagging every later step forever.
        self.count = torch.where(moved, 0, self.count)
        self.streak = torch.where(moved, 0, self.streak)
        self.grad_streak = torch.where(moved, 0, self.grad_streak)
        # Only healthy steps shape the baseline. The slot is selected by comparison, not used as an
        # index: a 0-d tensor index is read on the host (a sync every step).
        write = good & (torch.arange(cfg.window, device=self.device) == self.count % cfg.window)
        self.losses = torch.where(write, log_loss, self.losses)
        self.norms = torch.where(write, log_norm, self.norms)
        self.count += good.long()
        self.pending.append((step, torch.stack([kind.double(), loss, norm])))
        return discard.float()

    def drain(self) -> list[dict[str, Any]]:
        """Events since the last drain (one host sync for all of them)."""
        if not self.pending:
            return []
        steps = [s for s, _ in self.pending]
        rows = torch.stack([t for _, t in self.pending]).tolist()
        self.pending = []
        return [
            {"step": s, "kind": KIND_NAMES[int(k)], "loss": loss, "grad_norm": norm}
            for s, (k, loss, norm) in zip(steps, rows)
            if int(k) != OK
        ]

    def action_for(self, kind: str) -> str:
        return {
            "nonfinite": self.cfg.on_nonfinite,
            "loss_spike": self.cfg.on_spike,
            "grad_spike": self.cfg.on_grad_spike,
            "persistent_spike": self.cfg.on_persistent,
        }[kind]

    def after_rollback(self) -> None:
        """The restored model starts a fresh baseline (the old one may include the run-up to the spike)."""
        self._reset_window()
        self.pending = []
