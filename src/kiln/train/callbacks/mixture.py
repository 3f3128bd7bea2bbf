"""A mixture's changes of weights as they happen: a stage begins, a fork's new mix takes over,
or a source reaches its max_epochs (its weight then goes to the others): one event in
events.jsonl (`kind: mixture`) and one console line each."""

from __future__ import annotations

from kiln.train.callbacks.base import Callback


class MixtureEvents(Callback):
    name = "mixture"
    order = 10

    def __init__(self, options: object = None):
        super().__init__(options)
        self.changes: dict[int, list[str]] = {}

    def on_run_start(self, trainer) -> None:
        schedule = getattr(trainer.sampler, "schedule", None)
        self.changes = schedule.changes() if schedule is not None else {}

    def on_step_start(self, trainer, step: int, data_index: int) -> None:
        what = self.changes.get(data_index)
        if not what:
            return
        schedule = trainer.sampler.schedule
        total = sum(schedule.weights_at(data_index)) or 1.0
        weights = {n: round(w / total, 6) for n, w in zip(schedule.names, schedule.weights_at(data_index))}
        if trainer.is_main:
            trainer.run.log_event(
                {"kind": "mixture", "step": step, "data_index": data_index, "changes": what, "weights": weights}
            )
        shown = ", ".join(f"{n} {w:.3g}" for n, w in weights.items())
        trainer.say(f"  mixture at step {step}: {'; '.join(what)} -> weights {shown}")
