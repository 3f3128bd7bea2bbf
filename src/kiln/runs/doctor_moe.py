"""The old import path of the doctor's mixture-of-experts rule, now kiln.runs.doctor.moe
(tests/integration/run_tools_reference.py, a frozen copy of the rules, imports it from here)."""

from kiln.runs.doctor.moe import COLLAPSE_MIN_RATIO, COLLAPSE_SHARE, LOAD_KEY, MIN_RECORDS, router_collapse

__all__ = ["COLLAPSE_MIN_RATIO", "COLLAPSE_SHARE", "LOAD_KEY", "MIN_RECORDS", "router_collapse"]
