"""A plugin callback for tests that train in a subprocess: after the first step, rank 0 writes
the class name of every module of the model's first part to <run>/layer_types.json."""

from __future__ import annotations

from kiln.train.callbacks import Callback, register_callback


@register_callback("layer_types")
class LayerTypes(Callback):
    def __init__(self, options=None):
        super().__init__(options)
        self.written = False

    def on_step_end(self, trainer, result):
        if not self.written and trainer.is_main:
            types = {n: type(m).__name__ for n, m in trainer.module.parts[0].named_modules()}
            trainer.run.write_json("layer_types.json", types)
        self.written = True
