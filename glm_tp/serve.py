"""Rank coordination: rank 0 decides, the other ranks follow its broadcast commands.

Commands are small tuples sent with one object broadcast:
  ("generate", [Request, ...])   every rank runs Engine.generate on the same requests
  ("settings", GenerationConfig) new default settings
  ("noop",)                      keep-alive while rank 0 waits for a person, so idle workers never
                                 reach the collective timeout (a dead rank still fails it)
  ("shutdown",)                  workers return
"""
from __future__ import annotations

from typing import Callable

from .dist import TPContext
from .generation import Engine
from .requests import GenerationConfig, Request, Result

KEEPALIVE_S = 10.0


class Coordinator:
    """Rank 0's handle on all ranks."""

    def __init__(self, tp: TPContext, engine: Engine):
        self.tp, self.engine = tp, engine

    def generate(self, requests: list[Request], interrupt: Callable[[], bool] | None = None) -> list[Result]:
        self.tp.broadcast_object(("generate", requests))
        return self.engine.generate(requests, interrupt)

    def set_default(self, config: GenerationConfig) -> None:
        self.tp.broadcast_object(("settings", config))
        self.engine.default = config

    def keepalive(self) -> None:
        self.tp.broadcast_object(("noop",))

    def shutdown(self) -> None:
        self.tp.broadcast_object(("shutdown",))


def worker_loop(tp: TPContext, engine: Engine) -> None:
    """Ranks > 0: follow rank 0 until it says shutdown."""
    while True:
        command = tp.broadcast_object(None)
        if command[0] == "generate":
            engine.generate(command[1])
        elif command[0] == "settings":
            engine.default = command[1]
        elif command[0] == "shutdown":
            return
