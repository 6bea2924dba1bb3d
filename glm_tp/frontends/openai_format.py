"""OpenAI request bodies to glm-tp requests: the one translation the HTTP server and JSONL batch jobs share.

Endpoints: /v1/completions (`prompt`: a string or a list of strings, one choice per prompt; `suffix`
makes the prompt `prompt [MASK] suffix`) and /v1/chat/completions (`messages`, whose contents are
joined one per line; GLM-130B is not a chat model, so this is plain infilling; content-part lists are
read as their text parts). Fields: max_tokens (max_completion_tokens), temperature (0 = greedy),
top_p, n (draws with seeds seed..seed+n-1), seed, stop, logprobs/top_logprobs, echo, stream,
stream_options.include_usage; `user` and other OpenAI fields glm-tp has no use for are ignored. A
null value means "not given", as in OpenAI's API. GLM settings (any GenerationConfig key) go under
"glm" (the official client sends them with extra_body={"glm": {...}}) and win over the OpenAI fields.
Every mistake raises `OpenAIError` naming the field and what it allows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from glm_tp.engine.types import (
    LIMITS,
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOPS,
    GenerationConfig,
    Request,
    short_repr,
)
from glm_tp.frontends import structured
from glm_tp.frontends import tools as tool_calls
from glm_tp.text.blanks import MASK_PATTERN
from glm_tp.text.chat import ChatFormat
from glm_tp.text.unicode import TextError, check_strings

URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
MAX_N = 16
MAX_CHOICES = 64  # prompts x n in one body


class OpenAIError(ValueError):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = "invalid_value"):  # noqa: A002
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """One OpenAI body, checked: the requests to run (choice i = prompt i // n, draw i % n) and how to answer."""

    kind: str                          # completion | chat
    prompts: list[str]
    requests: list[Request]
    n: int = 1
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None        # top alternatives per token; None: no logprobs
    infill: list[bool] = field(default_factory=list)  # per prompt: has a mask, so the answer is the filled text
    tools: tool_calls.ToolSpec | None = None  # chat with tools: how the reply is read (frontends/tools.py)

    def prompt_of(self, choice: int) -> int:
        return choice // self.n


# -- field checks -----------------------------------------------------------------------------------
def _int(value: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo) and \
        (hi is None or value <= hi)
    if not ok:
        span = f" between {lo} and {hi}" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise OpenAIError(f"{name} must be an integer{span}, not {short_repr(value)}", name)
    return value  # type: ignore[return-value]


def _number(value: object, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise OpenAIError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], not {short_repr(value)}",
                          name)
    return float(value)  # type: ignore[arg-type]


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise OpenAIError(f"{name} must be true or false, not {short_repr(value)}", name)
    return value


def _stops(value: object) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, "
                          f"not {short_repr(value)}", "stop")
    return tuple(stops)


def _get(body: dict, name: str, check: Callable[..., object], *args: object) -> object:
    """The checked value of an optional field; None when absent or null."""
    value = body.get(name)
    return None if value is None else check(value, name, *args)


# -- prompts ----------------------------------------------------------------------------------------
def _completion_prompts(body: dict) -> tuple[list[str | list[int]], list[bool]]:
    """The prompts (text, or token ids as the API allows: a list of ids, or a list of such lists), and for
    each whether it is infilling (a text prompt with a mask: the answer is the filled text)."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or (prompt and _ids(prompt)) else prompt
    if not isinstance(prompts, list) or not prompts or not (all(isinstance(p, str) for p in prompts) or
                                                            all(_ids(p) for p in prompts)):
        raise OpenAIError(f"prompt must be a string, a non-empty list of strings, a non-empty list of token ids "
                          f"or a list of such lists, not {_short(prompt)}", "prompt")
    suffix = body.get("suffix")
    if suffix is None:
        return prompts, [isinstance(p, str) and bool(MASK_PATTERN.search(p)) for p in prompts]
    if not isinstance(suffix, str) or not all(isinstance(p, str) for p in prompts):
        raise OpenAIError(f"suffix must be a string, with text prompts, not {_short(suffix)}", "suffix")
    return [f"{p}[MASK]{suffix}" for p in prompts], [False] * len(prompts)  # the answer: what goes between


def _ids(value: object) -> bool:
    """A non-empty list of token ids (the engine checks them against the vocabulary)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in value)


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise OpenAIError(f"{where} must be a string or a list of content parts, not {_short(content)}", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}} "
                              f"(glm-tp reads text only), not {_short(part)}", f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _chat_messages(body: dict) -> list[dict]:
    """The messages with their contents as text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, "
                          f"not {_short(messages)}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(f"messages[{i}] must be an object with a string 'role', not {_short(m)}", f"messages[{i}]")
        out.append({"role": m["role"], "content": _content_text(m.get("content"), f"messages[{i}].content")})
    return out


def _chat_prompt(body: dict, chat: ChatFormat | None) -> tuple[list[str], list, tool_calls.ToolSpec | None]:
    """The chat's text (its contents one per line), its ids in the model's chat format (None without one) and
    its tools."""
    messages = _chat_messages(body)
    prompts = ["\n".join(m["content"] for m in messages)]
    template = chat.template if chat else None
    try:
        tools = tool_calls.parse_tools(body, template)
        messages = tool_calls.history(body, messages, template)
    except tool_calls.ToolError as e:
        raise OpenAIError(str(e), e.param) from None
    if chat is None:
        return prompts, [None], tools
    try:
        return prompts, [chat(messages, **tool_calls.chat_options(tools))], tools
    except ValueError as e:
        raise OpenAIError(str(e), "messages") from None


def _short(value: object) -> str:
    return short_repr(value, 60)


# -- settings ---------------------------------------------------------------------------------------
def _changes(body: dict, kind: str) -> dict[str, object]:
    """GenerationConfig changes from the OpenAI fields."""
    changes: dict[str, object] = {}
    for name in ("max_tokens", "max_completion_tokens"):
        value = _get(body, name, _int, 1, int(LIMITS["max_new_tokens"].hi))
        if value is not None:
            changes["max_new_tokens"] = value
    temperature = _get(body, "temperature", _number, 0.0, 2.0)
    if temperature is not None:
        changes.update(strategy="greedy") if temperature == 0 else changes.update(strategy="sample",
                                                                                  temperature=temperature)
    top_p = _get(body, "top_p", _number, 0.0, 1.0, True)
    if top_p is not None:
        changes["top_p"] = top_p
        changes.setdefault("strategy", "sample")
    seed = _get(body, "seed", _int, 0, MAX_SEED)
    if seed is not None:
        changes["seed"] = seed
    if body.get("stop") is not None:
        changes["stop"] = _stops(body["stop"])
    logprobs = _logprobs(body, kind)
    if logprobs is not None:
        changes["logprobs"] = logprobs
    return changes


def _logprobs(body: dict, kind: str) -> int | None:
    if kind == "completion":
        return _get(body, "logprobs", _int, 0, MAX_LOGPROBS)  # type: ignore[return-value]
    wanted = _get(body, "logprobs", _bool)
    top = _get(body, "top_logprobs", _int, 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise OpenAIError("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None  # type: ignore[return-value]


def _config(body: dict, kind: str, default: GenerationConfig) -> GenerationConfig:
    try:
        config = default.updated(**_changes(body, kind))
    except OpenAIError:
        raise
    except ValueError as e:
        raise OpenAIError(str(e)) from None
    glm = body.get("glm")
    if glm is None:
        return config
    if not isinstance(glm, dict):
        raise OpenAIError(f"glm must be an object of GLM settings such as {{\"strategy\": \"beam\", "
                          f"\"num_beams\": 4}}, not {_short(glm)}", "glm")
    try:
        return config.updated(**glm)
    except ValueError as e:
        raise OpenAIError(f"glm: {e}", "glm") from None


# -- the translation --------------------------------------------------------------------------------
def parse_body(kind: str, body: object, default: GenerationConfig, id_prefix: str,
               chat: ChatFormat | None = None, decode: Callable[[list[int]], str] | None = None) -> Parsed:
    """An OpenAI request body to glm-tp requests, with ids `{id_prefix}.{choice}`; raises OpenAIError.
    chat: the model's chat format (messages -> context ids); without one, message contents are joined one
    per line and run as a plain prompt (GLM-130B is no chat model). decode: the text of token ids, to echo a
    prompt sent as ids."""
    if not isinstance(body, dict):
        raise OpenAIError(f"the request body must be a JSON object, not {_short(body)}", None)
    try:
        check_strings(body, "")
    except TextError as e:
        raise OpenAIError(str(e), e.field or None) from None
    tools = None
    if kind == "completion":
        given, infill = _completion_prompts(body)
        ids = [p if isinstance(p, list) else None for p in given]
        prompts = [p if isinstance(p, str) else (decode(p) if decode else "") for p in given]
    else:
        prompts, ids, tools = _chat_prompt(body, chat)
        infill = [bool(MASK_PATTERN.search(prompts[0])) and chat is None]
    config = _config(body, kind, default)
    n = _get(body, "n", _int, 1, MAX_N) or 1
    if len(prompts) * n > MAX_CHOICES:  # type: ignore[operator]
        raise OpenAIError(f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices: send fewer", "n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise OpenAIError(f"model must be a string, not {_short(model)}", "model")
    stream = bool(_get(body, "stream", _bool))
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise OpenAIError("stream_options must be an object such as {\"include_usage\": true}, "
                          "and is only allowed with stream: true", "stream_options")
    include_usage = bool(_get(options or {}, "include_usage", _bool))
    echo = bool(_get(body, "echo", _bool)) if kind == "completion" else False
    requests = [Request(f"{id_prefix}.{p * n + k}", text=None if ids[p] else prompt, token_ids=ids[p],
                        config=config.updated(seed=(config.seed + k) % (MAX_SEED + 1)))
                for p, prompt in enumerate(prompts) for k in range(n)]  # type: ignore[arg-type]
    try:
        structured.constrain(body, requests)
    except structured.FormatError as e:
        raise OpenAIError(str(e), structured.FIELD) from None
    if tools is not None and tools.calls and any(r.grammar for r in requests):
        raise OpenAIError("response_format applies to a plain reply: with tools, send it with tool_choice \"none\" "
                          "(a call's arguments follow the function's parameters schema)", structured.FIELD)
    for r in requests:  # a forced tool call
        r.grammar = tool_calls.grammar(tools) or r.grammar
    return Parsed(kind, prompts, requests, n=n, model=model, stream=stream,  # type: ignore[arg-type]
                  include_usage=include_usage, echo=echo, logprobs=config.logprobs, infill=infill, tools=tools)


def parse_batch_line(number: int, obj: dict, default: GenerationConfig, chat: ChatFormat | None = None) -> Parsed:
    """An OpenAI batch request line {"custom_id", "method", "url", "body"}; raises OpenAIError."""
    if obj.get("method", "POST") != "POST":
        raise OpenAIError(f"method must be POST, not {_short(obj.get('method'))}", "method")
    url = obj.get("url")
    if url not in URLS:
        raise OpenAIError(f"url {_short(url)} is not supported: use {' or '.join(URLS)}", "url")
    parsed = parse_body(URLS[url], obj.get("body"), default, str(number), chat)
    if parsed.stream:
        raise OpenAIError("stream: true is not available in batch jobs", "stream")
    return parsed
