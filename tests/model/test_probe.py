"""kernels/probe.py: each (kernel, device, data type) is checked once; a check that raises counts as failed."""
from __future__ import annotations

import importlib.util

import torch

from glm_tp.kernels import probe


def test_a_check_runs_once_per_key_and_an_exception_is_a_no(monkeypatch):
    monkeypatch.setattr(probe, "RESULTS", {})
    calls = []
    cpu = torch.device("cpu")

    def check() -> bool:
        calls.append(1)
        return True

    assert probe.works("k", cpu, "int8", check) and probe.works("k", cpu, "int8", check)
    assert len(calls) == 1
    assert probe.works("k", cpu, "int4", check) and len(calls) == 2  # another data type: its own check

    def broken() -> bool:
        raise RuntimeError("does not build here")

    assert not probe.works("other", cpu, "fp32", broken)
    assert probe.RESULTS == {("k", "cpu", "int8"): True, ("k", "cpu", "int4"): True, ("other", "cpu", "fp32"): False}


def test_numba_available_asks_the_import_system(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not probe.numba_available()
