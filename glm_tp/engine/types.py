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

from glm_tp.engine.constraints import ConstraintFactory, Grammar

STRATEGIES = ("greedy", "sample", "beam")
MAX_LOGPROBS = 20
MAX_STOPS = 16
MAX_NEW_TOKENS = 1 << 20               # far above any model's max_len, which the engine checks
MAX_TOP_K = 1 << 20                    # larger values mean "off" in effect; the sampler caps it at the vocab
MAX_BEAMS = 64
MAX_SEED = (1 << 63) - 1               # a torch generator's seed is an int64


# why a request was refused at submission (Result.error_code), besides text.blanks' CONTEXT_LENGTH and
# INVALID_PROMPT; front ends map them to their answers
QUEUE_FULL = "queue_full"  # the waiting queue is full: try again later (HTTP 503)


@dataclass(frozen=True)
class Limit:
    """The range a numeric setting allows: [lo, hi], or (lo, hi] when lo_open."""

    lo: float
    hi: float
    lo_open: bool = False
    note: str = ""                     # what a special value means, for the error message

    def allows(self, value: float) -> bool:
        return (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi

    def describe(self) -> str:
        def shown(x: float) -> str:
            return str(int(x)) if x == int(x) else str(x)
        return f"{'(' if self.lo_open else '['}{shown(self.lo)}, {shown(self.hi)}]{self.note}"

    def check(self, name: str, value: float) -> None:
        if not self.allows(value):
            raise ValueError(f"{name} must be in {self.describe()}, not {short_repr(value)}")


# The one table of every numeric generation setting's bounds. Every front end (HTTP, JSONL, TTY `/set`,
# the command line) reaches it through GenerationConfig.updated, so no value outside it gets to torch.
LIMITS: dict[str, Limit] = {
    "max_new_tokens": Limit(1, MAX_NEW_TOKENS, note=" (and within the engine's max_len)"),
    "temperature": Limit(0, 100, lo_open=True, note=" (use strategy=greedy for argmax)"),
    "top_k": Limit(0, MAX_TOP_K, note=" (0 turns it off)"),
    "top_p": Limit(0, 1, lo_open=True, note=" (1 turns it off)"),
    "num_beams": Limit(1, MAX_BEAMS),
    "length_penalty": Limit(-10, 10),
    "no_repeat_ngram_size": Limit(0, MAX_NEW_TOKENS, note=" (0 turns it off)"),
    "min_new_tokens": Limit(0, MAX_NEW_TOKENS),
    "seed": Limit(0, MAX_SEED),
    "logprobs": Limit(0, MAX_LOGPROBS, note=" (or null for none)"),
}


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
        """Every value within its bounds (`LIMITS`), else ValueError naming the setting and what it allows."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None or name != "logprobs":
                limit.check(name, value)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be at most max_new_tokens ({self.max_new_tokens}), "
                             f"not {self.min_new_tokens}")
        if len(self.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOPS} non-empty strings")

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
    """An integer exactly (no float round trip: 2**63 stays 2**63, and the bounds refuse it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"expected an integer, got {short_repr(v)}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    try:
        f = _as_float(v)
    except ValueError:
        raise ValueError(f"expected an integer, got {short_repr(v)}") from None
    if f != int(f):
        raise ValueError(f"expected an integer, got {short_repr(v)}")
    return int(f)


def short_repr(v: object, limit: int = 40) -> str:
    """A value for an error message: cut short, and a huge integer by its size."""
    if isinstance(v, int) and v.bit_length() > 128:  # repr of a huge int is slow, or refused past 4300 digits
        return f"an integer of about {int(v.bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(v)
    except ValueError:  # a container holding a huge integer
        return f"a {type(v).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _as_float(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"expected a number, got {short_repr(v)}")
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"expected a number, got {short_repr(v)}") from None
    except OverflowError:
        raise ValueError(f"expected a finite number, got {short_repr(v)}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {short_repr(v)}")
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
    grammar: Grammar | None = None     # what every fill must look like (structured output, a forced tool call)
    constraint: ConstraintFactory | None = None  # or the constraint itself, for callers of the Python API


LOGPROB_FLOOR = -9999.0  # reported for tokens of probability 0 (as vLLM does): JSON has no -Infinity


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
    leads: list[str] = field(default_factory=list)  # each blank's leading space in context (not in blanks)

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
    lead: str = ""                      # on a blank's first text: the space its answer carries in context


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
