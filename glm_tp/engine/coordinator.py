"""Rank coordination: rank 0's `Coordinator` runs the engine loop, the other ranks follow it.

Front ends on rank 0 (TTY, JSONL batch, HTTP) hand requests to `Coordinator.submit` from any thread
and get a handle; the thread that calls `run` (or `generate`) drives the engine (`Engine.drive`), which
admits them at its next step. The engine thread is the only one that touches the model or the process
group: so there is exactly one sequence of collectives, the one every rank follows (`worker_loop`).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

from glm_tp.engine.core import Engine
from glm_tp.engine.grammar import available as grammar_available
from glm_tp.engine.jobs import Job
from glm_tp.engine.plan import IDLE, SHUTDOWN
from glm_tp.engine.types import (
    QUEUE_FULL,
    Event,
    GenerationConfig,
    Request,
    RequestHandle,
    Result,
)
from glm_tp.text.blanks import shown_ids
from glm_tp.text.chat import ChatFormat, chat_format
from glm_tp.text.tool_calls import TOOL_TEMPLATES


class Coordinator:
    """Rank 0's handle on all ranks."""

    def __init__(self, tp, engine: Engine, max_waiting: int = 256):
        self.tp, self.engine = tp, engine
        self.max_waiting = max_waiting
        self._inbox: queue.Queue[Job] = queue.Queue()  # jobs submitted from other threads
        self._lock = threading.Lock()                  # keeps the waiting count honest across threads
        self._pending = 0                              # submitted, not yet handed to the scheduler

    # -- any thread ---------------------------------------------------------------------------------
    def submit(self, request: Request, listener: Callable[[Event], None] | None = None,
               limit: bool = True) -> RequestHandle:
        """Queue a request. A request that can never run, or one over `max_waiting` waiting requests
        (limit=False: no bound), gets a handle that is already done with its error (`Result.error_code`)."""
        handle, job = self.engine.accept(request, listener)
        if job is None:
            return handle
        with self._lock:
            if limit and self._pending + len(self.engine.scheduler.waiting) >= self.max_waiting:
                return RequestHandle.refused(request, f"{self.max_waiting} requests are waiting already: retry "
                                             f"later", QUEUE_FULL, listener)
            self._pending += 1
            self._inbox.put(job)
        return handle

    def load(self) -> dict[str, float]:
        """Requests waiting and running, and the engine's prefill and prefix-cache figures (Engine.stats)."""
        scheduler = self.engine.scheduler
        return {"waiting": self._pending + len(scheduler.waiting), "running": scheduler.running, **self.engine.stats()}

    def counters(self) -> dict[str, float]:
        """The engine's running totals for the metrics: the time its grammars took (sampler.GrammarTime)."""
        grammar = self.engine.sampler.grammar
        return {"grammar_seconds": grammar.seconds, "grammar_steps": grammar.steps, "grammar_rows": grammar.rows}

    @property
    def chat_format(self) -> ChatFormat | None:
        """Chat messages -> context ids in the model's chat format (None: the model has none)."""
        return chat_format(self.engine.model.cfg.chat_template, self.engine.tok)

    @property
    def features(self) -> dict[str, bool]:
        """What the model offers front ends: a chat format, blank infilling (GLM-130B, ChatGLM-6B; a causal
        model only continues its prompt), tool calls (ChatGLM3's and GLM-4's formats) and structured output
        (the grammar library is installed)."""
        cfg = self.engine.model.cfg
        return {"chat": bool(cfg.chat_template), "blank_infilling": not cfg.causal,
                "tool_calls": cfg.chat_template in TOOL_TEMPLATES, "structured_output": grammar_available()}

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (a prompt sent as ids, echoed back; a causal model's without its prefix)."""
        tok = self.engine.tok
        return tok.decode(shown_ids(list(ids), tok.special, self.engine.model.cfg.causal))

    @property
    def default(self) -> GenerationConfig:
        """The settings of requests that carry none."""
        return self.engine.default

    def set_default(self, config: GenerationConfig) -> None:
        """New default settings (only rank 0 decides, so workers need none)."""
        self.engine.default = config

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    # -- the engine thread --------------------------------------------------------------------------
    def _take_inbox(self, wait_s: float = 0.0) -> bool:
        """Hand submitted jobs to the scheduler; with wait_s, wait that long for the first one."""
        taken = False
        try:
            job = self._inbox.get(timeout=wait_s) if wait_s else self._inbox.get_nowait()
            while True:
                with self._lock:
                    self._pending -= 1
                self.engine.scheduler.add(job)
                taken = True
                job = self._inbox.get_nowait()
        except queue.Empty:
            return taken

    def step(self) -> None:
        """One engine iteration (admits what was submitted since the last one)."""
        self._take_inbox()
        self.engine.lead()

    def run(self, finished: Callable[[], bool], interrupt: Callable[[], bool] | None = None) -> None:
        """Drive the engine until `finished()` (see `Engine.drive`): the server runs it until its stop event
        is set, a batch job until its last line is written."""
        self.engine.drive(finished, self._take_inbox, interrupt)

    def generate(self, requests: list[Request], interrupt: Callable[[], bool] | None = None) -> list[Result]:
        """Run these requests to the end (the TTY, the Python API); interrupt() is polled every step and ends
        them all with finish_reason 'interrupted'."""
        handles = [self.submit(request, limit=False) for request in requests]
        self.run(lambda: all(h.done for h in handles), interrupt)
        return [h.result() for h in handles]

    def keepalive(self) -> None:
        self.engine.send(IDLE)

    def shutdown(self) -> None:
        self.engine.send(SHUTDOWN)


def worker_loop(tp, engine: Engine) -> None:  # noqa: ARG001 - the signature front ends know
    """Ranks > 0: follow rank 0 until it says shutdown."""
    engine.follow(until=SHUTDOWN)
