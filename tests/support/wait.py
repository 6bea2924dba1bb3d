"""Waiting on a readiness signal instead of sleeping for a guessed time."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(ready: Callable[[], T], timeout: float, what: str, context: Callable[[], str] | None = None,
               interval: float = 0.05) -> T:
    """Polls `ready()` until it returns something truthy and returns that, as soon as it holds; after
    `timeout` s fails naming `what` it waited for (and `context()`, e.g. the output so far)."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        if time.monotonic() > deadline:
            detail = f":\n{context()}" if context is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)
    return value
