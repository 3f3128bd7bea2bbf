"""Callbacks: the aspects of training (kiln.train.callbacks.base documents the events).

from kiln.train.callbacks import Callback, register_callback

@register_callback("my_monitor")
class MyMonitor(Callback):
    def on_step_end(self, trainer, result):
        ...
"""

from kiln.train.callbacks.base import Callback, CallbackList
from kiln.train.callbacks.registry import CALLBACKS, build_callbacks, register_callback

__all__ = ["CALLBACKS", "Callback", "CallbackList", "build_callbacks", "register_callback"]
