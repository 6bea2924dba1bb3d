"""Rank coordination: rank 0's `Coordinator` runs the engine loop, the other ranks follow it.

Front ends on rank 0 (TTY, JSONL batch, HTTP) hand requests to `Coordinator.submit` from any thread;
the thread that runs `serve` or `generate` steps the engine, which admits them at its next step. The
engine thread is the only one that touches the model or the process group: so there is exactly one
sequence of collectives, the one every rank follows (`worker_loop`).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from glm_tp.engine.core import Engine
from glm_tp.engine.jobs import error_result
from glm_tp.engine.plan import IDLE, SHUTDOWN
from glm_tp.engine.types import (
    Event,
    GenerationConfig,
    QueueFull,
    Request,
    RequestHandle,
    Result,
)
from glm_tp.text.chat import ChatFormat, chat_format

KEEPALIVE_S = 10.0


class Coordinator:
    """Rank 0's handle on all ranks."""

    def __init__(self, tp, engine: Engine, max_waiting: int = 256):
        self.tp, self.engine = tp, engine
        self.max_waiting = max_waiting
        self._inbox: queue.Queue = queue.Queue()  # jobs submitted from other threads
        self._lock = threading.Lock()             # keeps the waiting count honest across threads
        self._pending = 0                         # submitted, not yet handed to the scheduler

    # -- any thread ---------------------------------------------------------------------------------
    def submit(self, request: Request, listener: Callable[[Event], None] | None = None,
               limit: bool = True) -> RequestHandle:
        """Queue a request; raises QueueFull when `max_waiting` requests wait already (limit=False: never),
        and ValueError (PromptError) for one that can never run."""
        handle = RequestHandle(request, listener)
        job = self.engine.new_job(handle)
        with self._lock:
            if limit and self._pending + len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are waiting already: retry later")
            self._pending += 1
            self._inbox.put(job)
        return handle

    def load(self) -> dict[str, int]:
        scheduler = self.engine.scheduler
        return {"waiting": self._pending + len(scheduler.waiting), "running": scheduler.running}

    @property
    def chat_format(self) -> ChatFormat | None:
        """Chat messages -> context ids in the model's chat format (None: the model has none)."""
        return chat_format(self.engine.model.cfg.chat_template, self.engine.tok)

    def set_default(self, config: GenerationConfig) -> None:
        """New default settings for requests that carry none (only rank 0 decides, so workers need none)."""
        self.engine.default = config

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

    def serve(self, stop: threading.Event, idle_s: float | None = None) -> None:
        """Step while there is work, keep the workers alive while there is none (several keep-alives per
        collective timeout); once `stop` is set, finish the requests already running, cancel those still
        waiting, and return."""
        idle_s = idle_s or min(KEEPALIVE_S, self.tp.timeout_s / 4)
        scheduler = self.engine.scheduler
        idle_since = time.monotonic()
        while True:
            if stop.is_set():
                self._take_inbox()
                for job in scheduler.waiting:
                    job.handle.cancel()
                if not scheduler.busy:
                    return
            if scheduler.busy or self._take_inbox(wait_s=0.05):
                self.step()
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= idle_s:
                self.keepalive()
                idle_since = time.monotonic()

    def generate(self, requests: list[Request], interrupt: Callable[[], bool] | None = None) -> list[Result]:
        """Run these requests to the end (the TTY, the Python API); interrupt() is polled every step and ends
        them all with finish_reason 'interrupted'."""
        handles: list[RequestHandle | Result] = []
        for request in requests:
            try:
                handles.append(self.submit(request, limit=False))
            except ValueError as e:
                handles.append(error_result(request.id, str(e)))
        waiting = [h for h in handles if isinstance(h, RequestHandle)]
        stopped = False
        while not all(h.done for h in waiting):
            if not stopped and interrupt is not None and interrupt():
                self._take_inbox()
                self.engine.scheduler.stop_all("interrupted")
                stopped = True
            self.step()
        return [h.result() if isinstance(h, RequestHandle) else h for h in handles]

    def keepalive(self) -> None:
        self.engine.send(IDLE)

    def shutdown(self) -> None:
        self.engine.send(SHUTDOWN)


def worker_loop(tp, engine: Engine) -> None:  # noqa: ARG001 - the signature front ends know
    """Ranks > 0: follow rank 0 until it says shutdown."""
    engine.follow(until=SHUTDOWN)
