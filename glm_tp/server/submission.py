"""One HTTP call's requests in the engine: events cross from the engine thread to the asyncio loop.

The engine calls each request's listener on its own thread; the listener only schedules a put on the
server's loop (`call_soon_threadsafe`), so it never blocks the engine. The route awaits the events,
cancels every request when the client goes away or the request times out, and reports timings.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Protocol

from glm_tp.engine.types import Delta, Done, Event, Request, RequestHandle, Result
from glm_tp.server.metrics import Metrics, Timing
from glm_tp.text.chat import ChatFormat


class Backend(Protocol):
    """What the server needs of the engine's coordinator (rank 0)."""

    def submit(self, request: Request, listener: Callable[[Event], None] | None = None) -> RequestHandle: ...

    def load(self) -> dict: ...

    def counters(self) -> dict: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def chat_format(self) -> ChatFormat | None: ...

    @property
    def features(self) -> dict[str, bool]: ...


class EngineFailed(RuntimeError):
    """The engine loop stopped (a rank was lost): every open request ends with this."""


class Refused(Exception):
    """A request of the call was refused at submission (its result says why): the call is answered at once."""

    def __init__(self, result: Result):
        super().__init__(result.error)
        self.result = result


class Submission:
    """The requests of one call (one per choice), submitted together; all or none are accepted."""

    def __init__(self, backend: Backend, requests: list[Request], metrics: Metrics):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event | Exception]] = asyncio.Queue()
        self.results: dict[int, Result] = {}
        self.timings = [Timing(metrics) for _ in requests]
        self.streamed = [0] * len(requests)
        self.handles: list[RequestHandle] = []
        self.abandoned = False  # the route has closed: what still ends is counted here, not by events()
        try:
            for i, request in enumerate(requests):
                handle = backend.submit(request, self._listener(i))
                self.handles.append(handle)
                if handle.refusal is not None:
                    raise Refused(handle.result())
        except BaseException:
            self.cancel()  # a full queue or a refused prompt: none of this call's requests run
            raise

    def _listener(self, index: int) -> Callable[[Event], None]:
        def listen(event: Event) -> None:
            abandoned = self.abandoned and isinstance(event, Done)
            try:
                self.loop.call_soon_threadsafe(*((self._count, index, event) if abandoned else
                                                 (self.queue.put_nowait, (index, event))))
            except RuntimeError:  # the server's loop has closed: nobody is waiting any more
                pass
        return listen

    def _count(self, index: int, done: Done) -> None:
        """A request that ended after its call closed (cancelled on a disconnect or a timeout): its metrics."""
        if index not in self.results:
            r = self.results[index] = done.result
            self.timings[index].finished(r.finish_reason, r.prompt_tokens, r.completion_tokens, self.streamed[index])

    def abandon(self) -> None:
        """The route is done with this call: cancel what still runs, and count how it ends."""
        self.abandoned = True
        self.cancel()

    def fail(self, reason: str) -> None:
        """From any thread: end this call with EngineFailed."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (-1, EngineFailed(reason)))
        except RuntimeError:
            pass

    @property
    def finished(self) -> bool:
        return len(self.results) == len(self.handles)

    def cancel(self) -> None:
        for handle in self.handles:
            if not handle.done:
                handle.cancel()

    async def events(self, deadline: float) -> AsyncIterator[tuple[int, Event]]:
        """Events until every request is done; raises TimeoutError at `deadline` (loop time), EngineFailed."""
        # the deadline arrives as one more event (no timer per event; the builtin TimeoutError on every Python)
        timer = self.loop.call_at(deadline, lambda: self.queue.put_nowait((-1, TimeoutError())))
        try:
            while not self.finished:
                index, event = await self.queue.get()
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, Delta):
                    self.timings[index].generated(len(event.token_ids))
                    self.streamed[index] += len(event.token_ids)
                elif isinstance(event, Done):
                    r = event.result
                    self.results[index] = r
                    self.timings[index].finished(r.finish_reason, r.prompt_tokens, r.completion_tokens,
                                                 self.streamed[index])
                yield index, event
        finally:
            timer.cancel()

    def ordered_results(self) -> list[Result]:
        return [self.results[i] for i in range(len(self.handles))]


async def until_disconnected(receive: Callable) -> None:
    """Returns when the client has gone away (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
