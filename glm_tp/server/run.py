"""`input=http`: uvicorn on a background thread of rank 0, the engine loop on the main thread.

The main thread runs `Coordinator.run` until a stop event (engine steps and collectives); uvicorn's own
asyncio loop answers HTTP and hands requests to the coordinator. SIGTERM (or Ctrl-C) stops new calls (503,
/health fails), lets the calls in flight finish, stops uvicorn and returns. If the engine loop fails
(a lost rank fails a collective within timeout_s), /health fails, open calls end with a 503, and the
error is raised so the process exits non-zero.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Protocol

import uvicorn

from glm_tp.engine.types import GenerationConfig
from glm_tp.parallel.dist import failure_line
from glm_tp.server.app import ServerSettings, ServerState, build_app
from glm_tp.server.slow_clients import protocol
from glm_tp.server.submission import Backend

FAILED_HEALTH_S = 2.0  # how long a failed /health stays up before the process exits


class Serving(Backend, Protocol):
    """The coordinator as the server uses it: `run` (the engine loop) besides `submit` and `load`."""

    def run(self, finished: Callable[[], bool]) -> None: ...

    def keepalive(self) -> None: ...


def _start_uvicorn(app: object, settings: ServerSettings) -> tuple[uvicorn.Server, threading.Thread]:
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=int(settings.request_timeout_s), lifespan="off",
                            http=protocol(settings.read_timeout_s))
    server = uvicorn.Server(config)  # signal handlers stay with the main thread (uvicorn skips them off it)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ValueError(f"the HTTP server could not start on {settings.host}:{settings.port} "
                             f"(is the port in use?): set server.port")
        time.sleep(0.05)
    return server, thread


def bound_port(server: uvicorn.Server) -> int:
    return server.servers[0].sockets[0].getsockname()[1]


def run_server(coordinator: Serving, default: GenerationConfig, settings: ServerSettings,
               on_listening: Callable[[str], None] = print) -> None:
    coordinator.keepalive()  # every rank has loaded and follows before the port opens
    state = ServerState()
    stop = threading.Event()
    server, thread = _start_uvicorn(build_app(coordinator, default, settings, state), settings)

    def begin_shutdown(signum: int, frame: object) -> None:  # noqa: ARG001
        state.draining = True
        stop.set()
    previous = {s: signal.signal(s, begin_shutdown) for s in (signal.SIGTERM, signal.SIGINT)}
    on_listening(f"glm-tp server: http://{settings.host}:{bound_port(server)} (model {settings.model_name}; "
                 f"playground at /, OpenAI API under /v1)")
    try:
        coordinator.run(stop.is_set)
    except BaseException as e:
        state.fail(f"{type(e).__name__}: {failure_line(e)}")
        time.sleep(FAILED_HEALTH_S)  # monitors see /health fail before the process goes
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.should_exit = True
        thread.join(timeout=settings.request_timeout_s + 5)
