"""The old import path of the doctor's outcome rule, now in kiln.runs.doctor.progress
(tests/integration/run_tools_reference.py, a frozen copy of the rules, imports it from here)."""

from kiln.runs.doctor.progress import (
    EARLY_RISE,
    EARLY_RISE_SHARE,
    MIN_STEPS_AFTER_RISE,
    NEAR_ENTROPY,
    NEAR_MAJORITY,
    TOKENS_PER_PARAM,
    _early_rise,
    _outcome,
    no_learning,
)

__all__ = [
    "EARLY_RISE",
    "EARLY_RISE_SHARE",
    "MIN_STEPS_AFTER_RISE",
    "NEAR_ENTROPY",
    "NEAR_MAJORITY",
    "TOKENS_PER_PARAM",
    "_early_rise",
    "_outcome",
    "no_learning",
]
