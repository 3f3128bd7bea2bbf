"""`routing`: mixture-of-experts routing statistics in every metrics record, per MoE layer
(built in whenever the model has experts):

    moe/layers.<i>/load_max_mean   the busiest expert's share of assignments over the mean share
                                   (1 = perfectly balanced; E = every token to one expert)
    moe/layers.<i>/entropy         mean router entropy per token, nats (ln E = uniform scores)
    moe/layers.<i>/dropped         share of assignments dropped by the capacity limit

Each step's counts are summed over the data-parallel ranks by the train module (the same
counts move the auxiliary-loss-free bias), so the figures describe the global batch; the record
holds their mean over the logging interval. `kiln doctor` reads them (a collapsed router).
"""

from __future__ import annotations

from kiln.train.callbacks.base import Callback
from kiln.train.step_api import RunView


class RoutingStats(Callback):
    name = "routing"

    def on_step_end(self, trainer: RunView, result) -> None:
        for name, value in trainer.module.routing.items():
            trainer.record_metric(name, value, "mean")
