"""Whether a kernel works here: each (kernel, device type, data type) is checked once per process, against
its torch definition on a small case, before any weight or layer is handed to it. A kernel that fails to
build, raises, or disagrees is simply not used (its owner warns and falls back).
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

# (kernel, device type, data type: "int8"/"int4" for a quantized weight, else the dtype's name) -> verdict
RESULTS: dict[tuple[str, str, str], bool] = {}


def numba_available() -> bool:
    """The CPU kernels need numba (the optional `cpu` extra); glm_tp runs without it."""
    return importlib.util.find_spec("numba") is not None


def works(kernel: str, device: torch.device, dtype: str, check: Callable[[], bool]) -> bool:
    """`check()`'s answer for this key, computed on first use; an exception counts as False."""
    key = (kernel, device.type, dtype)
    if key not in RESULTS:
        try:
            RESULTS[key] = bool(check())
        except Exception:  # noqa: BLE001 - a kernel that fails to build or run is simply not used
            RESULTS[key] = False
    return RESULTS[key]
