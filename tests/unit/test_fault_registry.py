"""The [faults] keys come from one list: each key switches a fault on or sizes one, and every
switch is one the fault callback recognises and the doctor's remedies switch off."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from kiln.config import FAULT_PARAMETERS, FAULT_TRIGGERS, FaultsConfig, load_config
from kiln.runs.doctor_rules import Context
from kiln.train.callbacks.faults import any_fault


def test_every_faults_key_is_a_switch_or_a_size():
    fields = [f.name for f in dataclasses.fields(FaultsConfig)]
    assert sorted(fields) == sorted(FAULT_TRIGGERS + FAULT_PARAMETERS)
    assert not set(FAULT_TRIGGERS) & set(FAULT_PARAMETERS)


@pytest.mark.parametrize("key", FAULT_TRIGGERS)
def test_each_switch_injects_a_fault_and_the_doctor_switches_it_off(key):
    default = getattr(FaultsConfig(), key)
    value = {list: "[3]", bool: "true"}.get(type(default), "3")
    cfg = load_config("tiny", overrides=[f"faults.{key}={value}"])
    assert any_fault(cfg.faults)
    off = Context.faults_off(SimpleNamespace(cfg=cfg))  # type: ignore[arg-type]  # only its cfg is read
    assert len(off) == 1 and off[0].startswith(f"faults.{key}=")
    assert not any_fault(load_config("tiny", overrides=[f"faults.{key}={value}", off[0]]).faults)


@pytest.mark.parametrize("key", FAULT_PARAMETERS)
def test_a_size_alone_injects_nothing(key):
    default = getattr(FaultsConfig(), key)
    cfg = load_config("tiny", overrides=[f"faults.{key}={default * 2 if default else 1}"])
    assert not any_fault(cfg.faults)
