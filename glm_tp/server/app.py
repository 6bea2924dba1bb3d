"""The OpenAI-compatible routes: a thin layer over the engine's coordinator (see submission.py).

POST /v1/completions and /v1/chat/completions (whole responses or server-sent events), GET /v1/models,
/health, /metrics and the playground at /. Errors are OpenAI error objects; bodies are parsed by
frontends/openai_format.py, the same translation JSONL batch jobs use, so both answer alike.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from glm_tp.engine.types import QUEUE_FULL, Delta, Done, GenerationConfig
from glm_tp.frontends import openai_format as oa
from glm_tp.frontends import openai_responses as responses
from glm_tp.frontends import tools
from glm_tp.server.metrics import Metrics
from glm_tp.server.schema import request_schema
from glm_tp.server.submission import (
    Backend,
    EngineFailed,
    Refused,
    Submission,
    until_disconnected,
)
from glm_tp.text.blanks import join_answer

PLAYGROUND = Path(__file__).with_name("playground.html")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None          # set: /v1 routes need "Authorization: Bearer <api_key>"
    model_name: str = "glm-tp"
    max_waiting: int = 64               # requests waiting for engine rows before new calls get 503
    request_timeout_s: float = 600.0
    retry_after_s: int = 1
    max_body_bytes: int = 4 << 20
    read_timeout_s: float = 30.0        # for a request's headers (server/slow_clients.py), then for its body


@dataclass
class ServerState:
    """What /health reports; shared by the routes and the thread that runs the engine."""

    draining: bool = False
    failure: str | None = None
    open_calls: set[Submission] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, reason: str) -> None:
        """The engine stopped: /health fails and every open call ends with an error."""
        with self.lock:
            self.failure = reason
            calls = list(self.open_calls)
        for call in calls:
            call.fail(reason)


def _error(e: oa.OpenAIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _Stream(StreamingResponse):
    """A server-sent event stream that closes its call however it ends, even when the client hung up
    before the first event (then the event generator never ran)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class Routes:
    def __init__(self, backend: Backend, default: GenerationConfig, settings: ServerSettings, state: ServerState):
        self.backend, self.default, self.settings, self.state = backend, default, settings, state
        self.metrics = Metrics(backend.load, backend.counters)
        self.counter = itertools.count()

    # -- checks -------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110); the key is compared in constant time
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise oa.OpenAIError("missing or wrong API key: send the header 'Authorization: Bearer <api_key>'",
                                 status=401, code="invalid_api_key")

    def _check_open(self) -> None:
        if self.state.failure or self.state.draining:
            why = "shutting down" if self.state.draining else f"failed ({self.state.failure})"
            raise oa.OpenAIError(f"the server is {why}: try another replica", status=503, type="server_error",
                                 code="unavailable")

    def _busy(self) -> oa.OpenAIError:
        return oa.OpenAIError(f"too many requests are waiting (max_waiting={self.settings.max_waiting}): "
                              f"retry after {self.settings.retry_after_s} s", status=503, type="server_error",
                              code="queue_full")

    async def _body(self, request: Request) -> object:
        """The JSON body; refused (413) once over the limit: a declared length before anything is read, a
        chunked body as soon as what has arrived passes it."""
        declared = request.headers.get("content-length", "")
        size, chunks = int(declared) if declared.isdigit() else 0, []
        if size <= self.settings.max_body_bytes:
            try:  # a body that arrives slower than this, or is shorter than its declared length, holds nothing
                size = await asyncio.wait_for(self._read(request, chunks), self.settings.read_timeout_s)
            except asyncio.TimeoutError:
                raise oa.OpenAIError(f"the body did not arrive within server.read_timeout_s="
                                     f"{self.settings.read_timeout_s:g} s", status=408, code="timeout") from None
        if size > self.settings.max_body_bytes:
            raise oa.OpenAIError(f"the body is {size} bytes or more, over server.max_body_bytes="
                                 f"{self.settings.max_body_bytes}", status=413, code="body_too_large")
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer over 4300 digits, deep nesting
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
            raise oa.OpenAIError(f"the body is not valid JSON ({why})", code="invalid_json") from None

    async def _read(self, request: Request, chunks: list[bytes]) -> int:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                break
            chunks.append(chunk)
        return size

    def _submit(self, parsed: oa.Parsed) -> Submission:
        try:
            call = Submission(self.backend, parsed.requests, self.metrics)
        except Refused as e:
            if e.result.error_code == QUEUE_FULL:
                raise self._busy() from None
            raise responses.refusal(e.result, parsed.kind) from None
        with self.state.lock:
            self.state.open_calls.add(call)
        return call

    def _close(self, call: Submission) -> None:
        call.abandon()  # no-op for finished requests; frees the rows of unfinished ones
        with self.state.lock:
            self.state.open_calls.discard(call)

    # -- completions --------------------------------------------------------------------------------
    async def generate(self, request: Request, kind: str) -> Response:
        self._authorize(request)
        body = await self._body(request)
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{next(self.counter)}-{secrets.token_hex(6)}"
        parsed = oa.parse_body(kind, body, self.default, response_id, self.backend.chat_format, self.backend.decode)
        if parsed.model not in (None, self.settings.model_name):
            raise oa.OpenAIError(f"model {parsed.model!r} does not exist: this server runs "
                                 f"{self.settings.model_name!r} (GET /v1/models)", "model", 404, code="model_not_found")
        self._check_open()
        call = self._submit(parsed)
        created = int(time.time())
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        if parsed.stream:
            return _Stream(self._stream(call, parsed, response_id, created, deadline), lambda: self._close(call))
        try:
            done = await self._wait(call, request, deadline)
        finally:
            self._close(call)
        if not done:
            return Response(status_code=499)  # the client went away; nobody reads this
        body = responses.response_body(parsed, call.ordered_results(), response_id, created, self.settings.model_name)
        self._count_calls(body["choices"])
        return JSONResponse(body)

    def _count_calls(self, choices: list[dict]) -> None:
        for choice in choices:
            outcome = tools.outcome(choice)
            if outcome is not None:
                self.metrics.tool_calls.labels(outcome).inc()

    async def _wait(self, call: Submission, request: Request, deadline: float) -> bool:
        """True when every request finished, False when the client disconnected first."""
        async def drain() -> None:
            async for _ in call.events(deadline):
                pass
        work = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            return False
        self._raise_for(work.exception())
        return True

    def _raise_for(self, error: BaseException | None) -> None:
        if isinstance(error, TimeoutError):
            raise oa.OpenAIError(f"the request took longer than request_timeout_s={self.settings.request_timeout_s}"
                                 f": ask for fewer tokens", status=504, type="server_error", code="timeout")
        if isinstance(error, EngineFailed):
            raise oa.OpenAIError(f"the engine stopped: {error}", status=503, type="server_error", code="unavailable")
        if error is not None:
            raise error

    async def _stream(self, call: Submission, parsed: oa.Parsed, response_id: str, created: int,
                      deadline: float) -> AsyncIterator[bytes]:
        model = self.settings.model_name

        def event(choices: list[dict], usage: dict | None = None) -> bytes:
            return _sse(responses.chunk(parsed, response_id, created, model, choices, usage))
        relay = tools.StreamRelay(parsed.tools, len(parsed.requests))  # replies that may be tool calls
        try:
            for i in range(len(parsed.requests)):
                p = parsed.prompt_of(i)
                echo = parsed.prompts[p] if parsed.echo and not parsed.infill[p] else ""
                if parsed.kind == "chat" or echo:
                    yield event(relay.delta(responses.chunk_choice(parsed, i, echo, first=True)))
            sent = [""] * len(parsed.requests)
            async for i, ev in call.events(deadline):
                if isinstance(ev, Delta) and (ev.text or ev.logprobs):
                    sent[i] += ev.text
                    text, prompt = ev.text, parsed.prompts[parsed.prompt_of(i)]
                    if parsed.echo and not parsed.infill[parsed.prompt_of(i)] and ev.lead:  # as the whole answer's
                        text = join_answer(prompt, ev.lead + text)[len(prompt):]
                    choices = relay.delta(responses.chunk_choice(parsed, i, text, ev.logprobs, blank=ev.blank))
                    if choices:
                        yield event(choices)
                elif isinstance(ev, Done):
                    failed = responses.result_error(parsed, ev.result)
                    if failed is not None:
                        raise failed
                    rest = responses.unsent_text(parsed, i, ev.result, sent[i])
                    for choice in relay.done(responses.chunk_choice(parsed, i, rest, result=ev.result),
                                             responses.answer_text(parsed, i, ev.result)):
                        self._count_calls([choice])
                        yield event([choice])
            if parsed.include_usage:
                yield event([], responses.usage(parsed, call.ordered_results()))
        except (TimeoutError, EngineFailed, oa.OpenAIError) as e:
            try:
                self._raise_for(e)
            except oa.OpenAIError as err:
                self.metrics.http_errors.labels(str(err.status)).inc()
                yield _sse(err.body())
        finally:  # also when the client disconnects: the stream is cancelled and the rows are freed
            self._close(call)
        yield b"data: [DONE]\n\n"

    # -- the rest -----------------------------------------------------------------------------------
    def models(self, request: Request) -> dict:
        """The one model; its "glm" field says what it offers (the playground picks its view by it)."""
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "glm-tp", "glm": dict(self.backend.features)}]}

    def health(self) -> Response:
        if self.state.failure or self.state.draining:
            status = f"failed: {self.state.failure}" if self.state.failure else "draining"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok", **self.backend.load()})


def _body_schema(kind: str) -> dict:
    """The route reads its body itself (size limits, one parser), so the schema is declared, not inferred."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(kind)}}}}


def build_app(backend: Backend, default: GenerationConfig, settings: ServerSettings,
              state: ServerState | None = None) -> FastAPI:
    routes = Routes(backend, default, settings, state or ServerState())
    app = FastAPI(title="glm-tp", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.routes = routes

    @app.exception_handler(oa.OpenAIError)
    async def openai_error(_: Request, e: oa.OpenAIError) -> JSONResponse:
        routes.metrics.http_errors.labels(str(e.status)).inc()
        headers = {"Retry-After": str(settings.retry_after_s)} if e.status in (429, 503) else \
            {"WWW-Authenticate": 'Bearer realm="glm-tp"'} if e.status == 401 else None
        return _error(e, headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        routes.metrics.http_errors.labels(str(e.status_code)).inc()
        message = (f"no route {request.method} {request.url.path}: use POST /v1/completions, "
                   f"POST /v1/chat/completions or GET /v1/models") if e.status_code in (404, 405) else str(e.detail)
        return _error(oa.OpenAIError(message, status=e.status_code, code="not_found" if e.status_code == 404
                                     else "method_not_allowed" if e.status_code == 405 else None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        routes.metrics.http_errors.labels("500").inc()
        return _error(oa.OpenAIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error",
                                     code="internal_error"))

    @app.post("/v1/completions", openapi_extra=_body_schema("completion"))
    async def completions(request: Request) -> Response:
        return await routes.generate(request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=_body_schema("chat"))
    async def chat(request: Request) -> Response:
        return await routes.generate(request, "chat")

    app.get("/v1/models")(routes.models)
    app.get("/health")(routes.health)
    app.get("/metrics")(lambda: Response(routes.metrics.render(), media_type="text/plain; version=0.0.4"))
    app.get("/", response_class=HTMLResponse)(lambda: HTMLResponse(PLAYGROUND.read_text(encoding="utf-8")))
    return app
