"""Memory stays flat per request: a few thousand small requests through the coordinator leave no Python
objects behind (tracemalloc counts every allocation that is still alive, whatever the allocator keeps)."""
from __future__ import annotations

import gc
import tracemalloc

from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.types import GenerationConfig, Request
from tests.support.server import demo_engine

PROMPT = "list : drum key dog root elk . again : [gMASK]"


def _run(coordinator: Coordinator, count: int) -> None:
    config = GenerationConfig(max_new_tokens=2, logprobs=2)  # logprobs: the largest per-token records
    for start in range(0, count, 16):
        results = coordinator.generate([Request(f"r{start + i}", PROMPT, config=config) for i in range(16)])
        assert all(r.finish_reason in ("stop", "length") for r in results)


def _alive_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_memory_does_not_grow_per_request():
    engine = demo_engine(max_batch=8)
    coordinator = Coordinator(engine.tp, engine)
    _run(coordinator, 64)  # warm-up: caches, kernels and pools settle
    tracemalloc.start()
    try:
        _run(coordinator, 64)
        before = _alive_bytes()
        _run(coordinator, 2000)
        grown = _alive_bytes() - before
    finally:
        tracemalloc.stop()
    # a kept Result with its logprobs is several KB: 2000 of them would be MBs
    assert grown / 2000 < 256, f"{grown} bytes more after 2000 requests ({grown / 2000:.0f} per request)"
