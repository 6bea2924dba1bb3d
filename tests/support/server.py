"""An HTTP server on the demo model inside the test process: uvicorn on one thread, the engine loop
(`Coordinator.serve`) on another, as `input=http` runs them (there the engine loop has the main thread)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.core import Engine
from glm_tp.engine.types import GenerationConfig
from glm_tp.server.app import ServerSettings, build_app
from glm_tp.server.slow_clients import protocol
from tests.support import ROOT
from tests.support.engines import causal_checkpoint, engine_for
from tests.support.wait import wait_until

DEMO = ROOT / "glm_tp" / "demo"


def demo_engine(max_batch: int = 8, **defaults: object) -> Engine:
    return engine_for(DEMO, DEMO / "tokenizer.model", default=GenerationConfig(max_new_tokens=16).updated(**defaults),
                      max_batch=max_batch)


def causal_engine(root: Path, tokenizer: Path, chat_template: str = "chatglm", max_batch: int = 8) -> Engine:
    """An engine on a random causal 'tiny-chatglm2' with a chat format (written under `root` once)."""
    return engine_for(causal_checkpoint(root, 1, chat_template=chat_template), tokenizer,
                      default=GenerationConfig(max_new_tokens=16), max_batch=max_batch)


def slowed(engine: Engine, step_s: float) -> Engine:
    """Every decode step takes at least `step_s`: a request of N tokens then outlasts N * step_s on any
    machine, so tests of time limits and hang-ups do not depend on how fast the machine is."""
    step = engine.decoder.step

    def slow_step(*args, **kwargs):
        time.sleep(step_s)  # pacing, not a wait: the point is a floor on how long a request takes
        return step(*args, **kwargs)

    engine.decoder.step = slow_step
    return engine


def count_steps(engine: Engine) -> list[int]:
    """A one-item list that holds the number of decode steps `engine` runs from now on: a bound in steps
    holds on any machine, where one in seconds does not."""
    counted, step = [0], engine.decoder.step

    def counting_step(*args, **kwargs):
        counted[0] += 1
        return step(*args, **kwargs)

    engine.decoder.step = counting_step
    return counted


def watch_handles(coordinator: Coordinator) -> list:
    """The handles of every request submitted to `coordinator` from now on, in order."""
    handles, submit = [], coordinator.submit

    def recorded(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    coordinator.submit = recorded
    return handles


@dataclass
class LiveServer:
    url: str
    coordinator: Coordinator
    stop: threading.Event
    uvicorn: uvicorn.Server
    threads: list[threading.Thread]

    def close(self) -> None:
        self.stop.set()
        self.uvicorn.should_exit = True
        for t in self.threads:
            t.join(timeout=30)


def start(engine: Engine, settings: ServerSettings | None = None) -> LiveServer:
    settings = settings or ServerSettings(port=0, model_name="demo")
    coordinator = Coordinator(engine.tp, engine, max_waiting=settings.max_waiting)
    stop = threading.Event()
    app = build_app(coordinator, engine.default, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           http=protocol(settings.read_timeout_s)))
    threads = [threading.Thread(target=server.run, daemon=True),
               threading.Thread(target=coordinator.run, args=(stop.is_set,), daemon=True)]
    for t in threads:
        t.start()
    wait_until(lambda: server.started, 120, "uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", coordinator, stop, server, threads)
