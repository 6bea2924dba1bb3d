"""What a front end gives the engine and gets back: settings, requests, results, and streamed events.

Front ends (TTY, JSONL batch, HTTP) run on rank 0 only. They hand a `Request` to
`Coordinator.submit` (thread-safe) and always get a `RequestHandle`: one refused at once (a full
queue, a prompt that can never run) is already done with its error result. The engine loop reports
progress through the handle as events: `Delta` (new tokens of the blank being filled; beam search
reports none, its beams change until the end), `BlankDone` (a blank's final answer) and, last, `Done`
with the `Result`.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Union

STRATEGIES = ("greedy", "sample", "beam")
MAX_LOGPROBS = 20
MAX_STOPS = 16


# why a request was refused at submission (Result.error_code), besides text.blanks' CONTEXT_LENGTH and
# INVALID_PROMPT; front ends map them to their answers
QUEUE_FULL = "queue_full"  # the waiting queue is full: try again later (HTTP 503)


@dataclass
class GenerationConfig:
    strategy: str = "greedy"
    max_new_tokens: int = 64           # generated tokens per blank
    temperature: float = 1.0
    top_k: int = 0                     # 0 = off
    top_p: float = 1.0                 # 1.0 = off
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    seed: int = 1234
    return_all_beams: bool = False
    stop: tuple[str, ...] = ()         # generation of a blank ends when its text contains one of these
    logprobs: int | None = None        # None: off; N in 0..20: the chosen token's logprob and the top N

    def validate(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature > 0, "temperature must be > 0 (use strategy=greedy for argmax)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 turns it off)"),
            (self.num_beams >= 1, "num_beams must be at least 1"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be between 0 and max_new_tokens"),
            (len(self.stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in self.stop),
             f"stop must be at most {MAX_STOPS} non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be between 0 and {MAX_LOGPROBS} (or null for none)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def updated(self, **changes: object) -> "GenerationConfig":
        """A copy with fields changed (values are checked and converted to the field's type); unknown keys
        and values of the wrong kind raise ValueError naming the key."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        converted = {}
        for key, value in changes.items():
            if key not in types:
                raise ValueError(f"unknown generation setting {key!r}: use one of {', '.join(types)}")
            try:
                converted[key] = _CONVERT[types[key]](value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"generation setting {key!r}: {e}") from None
        new = dataclasses.replace(self, **converted)
        new.validate()
        return new


def _as_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"expected an integer, got {v!r}")
    try:
        f = _as_float(v)
    except ValueError:
        raise ValueError(f"expected an integer, got {v!r}") from None
    if f != int(f):
        raise ValueError(f"expected an integer, got {v!r}")
    return int(f)


def _as_float(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"expected a number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"expected a number, got {v!r}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {v!r}")
    return f


def _as_str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


def _as_bool(v: object) -> bool:
    if isinstance(v, bool):
        return v
    word = str(v).lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _as_stops(v: object) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise TypeError(f"expected a string or a list of strings, got {v!r}")


def _as_optional_int(v: object) -> int | None:
    return None if v is None or (isinstance(v, str) and v.lower() in ("none", "null")) else _as_int(v)


_CONVERT: dict[str, Callable[[object], object]] = {
    "int": _as_int, "float": _as_float, "str": _as_str, "bool": _as_bool,
    "tuple[str, ...]": _as_stops, "int | None": _as_optional_int,
}


@dataclass
class Request:
    id: str
    text: str | None = None
    token_ids: list[int] | None = None
    config: GenerationConfig | None = None


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the distribution it was chosen from (after bans,
    temperature, top-k and top-p; greedy and beam search: the banned, untempered softmax), and the top
    alternatives in the same distribution."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Result:
    id: str
    text: str = ""                     # the whole text with every blank filled
    blanks: list[str] = field(default_factory=list)
    blanks_token_ids: list[list[int]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""            # stop | length | interrupted | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    beams: list[str] | None = None
    error: str | None = None
    pieces: list[tuple[str, bool]] = field(default_factory=list)  # (text, is a filled blank), for display
    logprobs: list[TokenLogprob] | None = None  # every generated token of every blank, in order
    cut_by_max_len: bool = False       # an answer ended because the sequence filled max_len, not as asked
    error_code: str | None = None      # set when refused at submission: QUEUE_FULL, CONTEXT_LENGTH, ...

    @classmethod
    def failed(cls, request_id: str, message: str, code: str | None = None) -> "Result":
        return cls(id=request_id, finish_reason="error", error=message, error_code=code)


@dataclass
class Delta:
    request_id: str
    blank: int                          # 0-based index of the blank being filled
    token_ids: list[int]
    text: str                           # new text; text that may begin a stop string is held back
    logprobs: list[TokenLogprob] | None = None


@dataclass
class BlankDone:
    request_id: str
    blank: int
    text: str
    token_ids: list[int]


@dataclass
class Done:
    result: Result


Event = Union[Delta, BlankDone, Done]


class RequestHandle:
    """Rank 0's view of one submitted request. Events arrive from the engine loop's thread: to
    `listener` when one was given (it must not block), else into `events`."""

    def __init__(self, request: Request, listener: Callable[[Event], None] | None = None):
        self.request = request
        self.events: queue.Queue[Event] = queue.Queue()
        self._listener = listener
        self._done = threading.Event()
        self._result: Result | None = None
        self.cancelled = threading.Event()
        self.refusal: str | None = None  # the error code of a request refused at submission

    @classmethod
    def refused(cls, request: Request, message: str, code: str,
                listener: Callable[[Event], None] | None = None) -> "RequestHandle":
        """A request that never runs: a handle already done with its error result."""
        handle = cls(request, listener)
        handle.refusal = code
        handle.emit(Done(Result.failed(request.id, message, code)))
        return handle

    @property
    def id(self) -> str:
        return self.request.id

    def cancel(self) -> None:
        """Ask the engine to drop this request; its rows are freed within one step (thread-safe)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        if isinstance(event, Done):
            self._result = event.result
        (self._listener or self.events.put)(event)
        if isinstance(event, Done):
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        assert self._result is not None
        return self._result
