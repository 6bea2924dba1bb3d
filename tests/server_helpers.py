"""An HTTP server on the demo model inside the test process: uvicorn on one thread, the engine loop on another.

TEMPORARY: `StandIn` replaces the continuous-batching Coordinator until it lands on main; it runs
one request at a time with the old Engine.generate and reports each blank as one Delta. It is removed
when the real engine is merged (then `start` builds a real Coordinator).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import uvicorn

from conftest import ROOT
from glm_tp import load_model
from glm_tp.blanks import check_length, tokenize_prompt
from glm_tp.generation import Engine
from glm_tp.requests import BlankDone, Delta, Done, Event, GenerationConfig, QueueFull, Request, RequestHandle, Result
from glm_tp.server.app import ServerSettings, build_app
from glm_tp.tokenizer import load_tokenizer

DEMO = ROOT / "data" / "demo"


class StandIn:
    def __init__(self, engine: Engine, max_waiting: int = 1000):
        self.engine, self.max_waiting = engine, max_waiting
        self.waiting: queue.Queue[RequestHandle] = queue.Queue()
        self.running = 0

    def submit(self, request: Request, listener: Callable[[Event], None] | None = None) -> RequestHandle:
        if request.text is not None:
            check_length(tokenize_prompt(request.text, self.engine.tok), self.engine.decoder.max_len)
        if self.waiting.qsize() >= self.max_waiting:
            raise QueueFull("queue full")
        handle = RequestHandle(request, listener)
        self.waiting.put(handle)
        return handle

    def load(self) -> dict:
        return {"waiting": self.waiting.qsize(), "running": self.running}

    def keepalive(self) -> None:
        pass

    def serve(self, stop: threading.Event) -> None:
        while not (stop.is_set() and self.waiting.empty()):
            try:
                handle = self.waiting.get(timeout=0.05)
            except queue.Empty:
                continue
            if handle.cancelled.is_set():
                handle.emit(Done(Result(handle.id, finish_reason="cancelled")))
                continue
            self.running = 1
            result = self.engine.generate([handle.request], interrupt=handle.cancelled.is_set)[0]
            self.running = 0
            for b, (text, ids) in enumerate(zip(result.blanks, result.blanks_token_ids)):
                handle.emit(Delta(handle.id, b, ids, text))
                handle.emit(BlankDone(handle.id, b, text, ids))
            handle.emit(Done(result))


def demo_engine(max_batch: int = 8, **defaults: object) -> Engine:
    model = load_model(DEMO, progress=False)
    return Engine(model, load_tokenizer(DEMO / "tokenizer.model", model.cfg.special),
                  GenerationConfig(max_new_tokens=16).updated(**defaults), max_batch=max_batch)


@dataclass
class LiveServer:
    url: str
    coordinator: StandIn
    engine: Engine
    stop: threading.Event
    uvicorn: uvicorn.Server
    threads: list[threading.Thread]

    def close(self) -> None:
        self.stop.set()
        self.uvicorn.should_exit = True
        for t in self.threads:
            t.join(timeout=30)


def start(engine: Engine, settings: ServerSettings | None = None, max_waiting: int = 1000) -> LiveServer:
    settings = settings or ServerSettings(port=0, model_name="demo")
    coordinator = StandIn(engine, max_waiting)
    stop = threading.Event()
    app = build_app(coordinator, engine.default, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    threads = [threading.Thread(target=server.run, daemon=True),
               threading.Thread(target=coordinator.serve, args=(stop,), daemon=True)]
    for t in threads:
        t.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", coordinator, engine, stop, server, threads)
