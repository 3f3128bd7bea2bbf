"""A mixture's changes of weights as they happen: a stage begins, a fork's new mix takes over,
or a source reaches its max_epochs (its weight then goes to the others): one event in
events.jsonl (`kind: mixture`) and one console line each."""

from __future__ import annotations

from kiln.data.mixture_sampler import MixtureSampler
from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView


class MixtureEvents(Callback):
    name = "mixture"

    def __init__(self, options: object = None):
        super().__init__(options)
        self.changes: dict[int, list[str]] = {}

    def on_run_start(self, trainer: RunView) -> None:
        schedule = getattr(trainer.sampler, "schedule", None)
        self.changes = schedule.changes() if schedule is not None else {}

    def on_step_start(self, trainer: RunView, step: int, data_index: int) -> None:
        what = self.changes.get(data_index)
        if not what:
            return
        sampler = trainer.sampler
        assert isinstance(sampler, MixtureSampler)  # built for mixtures only (callbacks.builtin)
        schedule = sampler.schedule
        total = sum(schedule.weights_at(data_index)) or 1.0
        weights = {n: round(w / total, 6) for n, w in zip(schedule.names, schedule.weights_at(data_index))}
        event = {"kind": "mixture", "step": step, "data_index": data_index, "changes": what, "weights": weights}
        trainer.log_event(event)
        shown = ", ".join(f"{n} {w:.3g}" for n, w in weights.items())
        trainer.say(f"  mixture at step {step}: {'; '.join(what)} -> weights {shown}")
