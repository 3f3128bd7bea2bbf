"""The training guard: detect non-finite values and loss / gradient-norm spikes, and act.

Detection runs on the device every step without a host sync: the step's loss and gradient
norm are compared with a rolling window (mean + k standard deviations) and a flag tensor says
whether the update must be discarded. A fused optimizer skips a flagged update inside its
kernel (the same `found_inf` protocol the AMP grad scaler uses), so nothing waits; other
optimizers read the flag on the host.

The host learns what happened at the next logging sync, records every event in
`events.jsonl`, and carries out the configured action: `skip` (the update was already
discarded), `rollback` (restore the last good checkpoint and skip the batches from it to the
spike plus a margin, optionally with a lower learning rate for a while) or `stop`. Skipped
batch ranges belong to the trainer's checkpointed state (a fork may add some too), so a resumed
run skips them as well.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from kiln.config import GuardConfig
from kiln.errors import KilnError

OK, NONFINITE, LOSS_SPIKE, GRAD_SPIKE = 0, 1, 2, 3
PERSIST = 3  # consecutive spikes that mean the level itself has moved
KIND_NAMES = {NONFINITE: "nonfinite", LOSS_SPIKE: "loss_spike", GRAD_SPIKE: "grad_spike"}


class GuardStop(KilnError):
    """The guard stopped the run (configured `stop`, or too many interventions)."""


def data_index(step: int, skipped: list[list[int]]) -> int:
    """The data batch used by optimizer step `step`: the step-th batch index outside the
    (sorted, disjoint, inclusive) skipped ranges."""
    idx = step
    for lo, hi in skipped:
        if idx >= lo:
            idx += hi - lo + 1
    return idx


def add_range(skipped: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    """Merge [lo, hi] into the skipped ranges."""
    merged: list[list[int]] = []
    for a, b in sorted(skipped + [[lo, hi]]):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


@dataclass
class GuardState:
    """What the guard must remember across checkpoints."""

    interventions: int = 0
    lr_factor: float = 1.0
    lr_factor_until: int = -1  # optimizer step before which lr_factor applies

    def to_dict(self) -> dict[str, Any]:
        return {"interventions": self.interventions, "lr_factor": self.lr_factor,
                "lr_factor_until": self.lr_factor_until}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "GuardState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})  # older states held "skipped" too


class Guard:
    def __init__(self, cfg: GuardConfig, device: torch.device, state: GuardState | None = None,
                 judge_from: int = 0):
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

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to judge and act exactly as an uninterrupted one."""
        return {**self.state.to_dict(), "window": {"losses": self.losses.tolist(), "norms": self.norms.tolist(),
                                                   "count": int(self.count), "streak": int(self.streak)}}

    def load_state_dict(self, d: dict[str, Any] | None) -> None:
        if not d:
            return
        d = dict(d)
        window = d.pop("window", None)
        self.state = GuardState.from_dict(d)
        if window and len(window["losses"]) == self.cfg.window:
            self.losses = torch.tensor(window["losses"], device=self.device, dtype=torch.float64)
            self.norms = torch.tensor(window["norms"], device=self.device, dtype=torch.float64)
            self.count = torch.tensor(window["count"], device=self.device, dtype=torch.int64)
            self.streak = torch.tensor(window.get("streak", 0), device=self.device, dtype=torch.int64)

    def lr_scale(self, step: int) -> float:
        return self.state.lr_factor if step < self.state.lr_factor_until else 1.0

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Classify this step on the device; returns a float flag (1 = discard the update)."""
        loss, norm = loss.detach().double(), grad_norm.detach().double()
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        n = self.count.clamp(max=self.cfg.window)
        ready = (n >= self.cfg.min_history) & (step >= self.judge_from)
        denom = n.clamp(min=1).double()
        valid = (torch.arange(self.cfg.window, device=self.device) < n).double()

        def spike(history: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            mean = (history * valid).sum() / denom
            var = (((history - mean) * valid) ** 2).sum() / denom
            return ready & (value > mean + self.cfg.k * var.sqrt())

        kind = torch.where(~finite, NONFINITE,
                           torch.where(spike(self.losses, loss), LOSS_SPIKE,
                                       torch.where(spike(self.norms, norm), GRAD_SPIKE, OK)))
        if self.cfg.on_spike == "ignore":
            kind = torch.where(finite, OK, NONFINITE)
        good = kind == OK
        # A "spike" that persists is a new regime, not a spike: after PERSIST flagged steps in a
        # row the window restarts from the new level instead of flagging every step forever.
        self.streak = torch.where(good | (kind == NONFINITE), 0, self.streak + 1)
        regime_change = self.streak >= PERSIST
        self.count = torch.where(regime_change, 0, self.count)
        self.streak = torch.where(regime_change, 0, self.streak)
        slot = self.count % self.cfg.window
        self.losses[slot] = torch.where(good, loss, self.losses[slot])  # only healthy steps shape the baseline
        self.norms[slot] = torch.where(good, norm, self.norms[slot])
        self.count += good.long()
        self.pending.append((step, torch.stack([kind.double(), loss, norm])))
        return (~good).float()

    def drain(self) -> list[dict[str, Any]]:
        """Events since the last drain (one host sync for all of them)."""
        if not self.pending:
            return []
        steps = [s for s, _ in self.pending]
        rows = torch.stack([t for _, t in self.pending]).tolist()
        self.pending = []
        return [{"step": s, "kind": KIND_NAMES[int(k)], "loss": loss, "grad_norm": norm}
                for s, (k, loss, norm) in zip(steps, rows) if int(k) != OK]

    def action_for(self, kind: str) -> str:
        return self.cfg.on_nonfinite if kind == "nonfinite" else self.cfg.on_spike

    def after_rollback(self) -> None:
        """The restored model starts a fresh baseline (the old one may include the run-up to the spike)."""
        self._reset_window()
        self.pending = []
