"""Prometheus metrics of the HTTP server: queue depth, throughput and latency histograms."""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WINDOW_S = 10.0  # tokens/s is averaged over this window


class Metrics:
    """One registry per server (tests start several). `load` gives the engine's waiting/running counts,
    `counters` its running totals (the grammar's time)."""

    def __init__(self, load: Callable[[], dict], counters: Callable[[], dict] = dict):
        self.registry = CollectorRegistry()
        r = self.registry
        waiting = Gauge("glm_tp_requests_waiting", "requests waiting for engine rows", registry=r)
        running = Gauge("glm_tp_requests_running", "requests being generated", registry=r)
        waiting.set_function(lambda: load().get("waiting", 0))
        running.set_function(lambda: load().get("running", 0))
        # structured output: the sampler's time on grammar masks; seconds / steps is the grammar's time per step
        for name, doc in (("grammar_seconds", "seconds the sampler spent on grammar masks, in total"),
                          ("grammar_steps", "steps with at least one grammar-constrained row"),
                          ("grammar_rows", "grammar-constrained rows, summed over those steps")):
            Gauge(f"glm_tp_{name}", doc, registry=r).set_function(lambda name=name: counters().get(name, 0))
        for key, what in (("prefix_cache_hit_rate", "prompt tokens reused from the prefix cache / prompt tokens"),
                          ("prefix_cache_reused_tokens", "prompt tokens reused from the prefix cache, not computed"),
                          ("prefill_prompt_tokens", "prompt tokens of admitted fills"),
                          ("prefix_cache_blocks_used", "prefix cache blocks holding a prefix")):
            Gauge(f"glm_tp_{key}", what, registry=r).set_function(lambda key=key: load().get(key, 0))
        self.requests = Counter("glm_tp_requests", "finished requests (one per choice) by finish reason",
                                ["finish_reason"], registry=r)
        self.http_errors = Counter("glm_tp_http_errors", "error responses by status", ["status"], registry=r)
        self.tool_calls = Counter("glm_tp_tool_calls", "replies that called a tool: read (valid) or not (invalid)",
                                  ["outcome"], registry=r)
        self.prompt_tokens = Counter("glm_tp_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("glm_tp_generated_tokens", "generated tokens", registry=r)
        Gauge("glm_tp_generated_tokens_per_second", f"generated tokens per second over the last {WINDOW_S:.0f} s",
              registry=r).set_function(self.tokens_per_second)
        self.ttft = Histogram("glm_tp_time_to_first_token_seconds", "from submission to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("glm_tp_inter_token_latency_seconds", "between consecutive generated tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("glm_tp_request_latency_seconds", "from submission to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def tokens(self, count: int) -> None:
        self.generated_tokens.inc(count)
        with self._lock:
            self._window.append((time.monotonic(), count))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - WINDOW_S:
                self._window.popleft()
            return sum(c for _, c in self._window) / WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Timing:
    """One choice's token timing, reported to the metrics as its events arrive."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start = metrics, time.monotonic()
        self.last: float | None = None

    def generated(self, count: int) -> None:
        """`count` new tokens arrived in one event; a later event's tokens share the gap since the last one."""
        if count <= 0:
            return
        now = time.monotonic()
        self.metrics.tokens(count)
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            for _ in range(count):
                self.metrics.itl.observe((now - self.last) / count)
        self.last = now

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, streamed: int) -> None:
        """`streamed`: tokens already counted from deltas (beam search streams none)."""
        if self.last is None and completion_tokens:
            self.metrics.ttft.observe(time.monotonic() - self.start)
        self.metrics.latency.observe(time.monotonic() - self.start)
        self.metrics.requests.labels(finish_reason).inc()
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.tokens(max(0, completion_tokens - streamed))
