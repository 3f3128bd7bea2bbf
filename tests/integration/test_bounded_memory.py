"""Bounded memory over a run (issue 34): nothing in the trainer, the guard or the callbacks grows
with the step count (no list of every loss, timing or event), so a run of a million steps holds
what a run of a thousand does. 2,000 steps of a model small enough for a few milliseconds a step,
evaluating and checkpointing now and then and logging every 10 steps: the resident memory at step
2,000 is within 20 MB of that at step 500, and the Python state the loop keeps does not grow."""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from collections import deque
from typing import Any

import numpy as np
import pytest
import torch

from kiln.train.callbacks.base import Callback

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2000
PAGE = os.sysconf("SC_PAGE_SIZE")
# what the loop holds but does not own: weights, optimizer state, data, the run folder, the config
NOT_THE_LOOPS = ("module", "data", "sampler", "val", "extra_val", "par", "spec", "cfg", "run", "callbacks")


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * PAGE


def held_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the containers, numbers and tensors reachable from `obj` through containers and
    Kiln's own objects (not into torch's or other libraries' objects)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        children: Any = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset, deque)):
        children = obj
    elif type(obj).__module__.startswith("kiln.") and hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        children = []
    return size + sum(held_bytes(child, seen) for child in children)


def loop_state_bytes(trainer) -> int:
    """What the trainer, its guard and its callbacks keep, apart from what they only point at."""
    seen = {id(trainer), *(id(getattr(trainer, name)) for name in NOT_THE_LOOPS)}
    own = {k: v for k, v in vars(trainer).items() if k not in NOT_THE_LOOPS}
    return held_bytes(own, seen) + sum(held_bytes(cb, seen) for cb in trainer.callbacks.items)


class Sampler(Callback):
    order = 99  # after every other callback's work of the step (logging, evaluation, checkpoints)

    def __init__(self):
        super().__init__()
        self.rss: dict[int, int] = {}
        self.state: dict[int, int] = {}
        self.at: dict[int, float] = {}

    def on_step_complete(self, trainer) -> None:
        if trainer.step in (500, STEPS):
            gc.collect()
            self.rss[trainer.step] = rss_bytes()
            self.state[trainer.step] = loop_state_bytes(trainer)
            self.at[trainer.step] = time.perf_counter()


def test_memory_does_not_grow_with_the_step_count(tmp_path, shared_corpus, tiny_config):
    from kiln.train.session import start_run

    cfg = tiny_config(
        shared_corpus,
        *("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16", "train.batch_size=2"),
        *(f"train.steps={STEPS}", "log.every=10", "eval.every=400", "checkpoint.every=400", "checkpoint.keep=1"),
        "guard.enabled=true",
    )
    sampler = Sampler()
    start_run(cfg, tmp_path / "runs", "long", callbacks=[sampler])
    per_step = (sampler.at[STEPS] - sampler.at[500]) / (STEPS - 500)
    grown_rss = sampler.rss[STEPS] - sampler.rss[500]
    grown_state = sampler.state[STEPS] - sampler.state[500]
    assert grown_rss <= 20 * 2**20, f"resident memory grew {grown_rss / 2**20:.1f} MB from step 500 to {STEPS}"
    # a float kept per logging step would be 150 x 32 bytes here: well over this bound
    assert grown_state <= 1024, f"the loop's own state grew {grown_state} bytes from step 500 to {STEPS}"
    assert per_step < 0.05, f"{1000 * per_step:.1f} ms a step: not the few milliseconds this test is sized for"
