"""OpenAI tool calls on the chat route (HTTP and batch lines): `tools` and `tool_choice` checked, earlier calls and
`role: tool` results put into the model's own format (text/tool_calls.py), a forced call's grammar, and the
model's reply read back into `tool_calls`, whole or streamed as OpenAI streams them.

tool_choice: "auto" (the default with tools: the model writes its reply's metadata line, empty or a function's
name), "none" (the tools are in the prompt, the reply is opened as plain content), "required" or
{"type": "function", "function": {"name": ...}} (the call is forced by a grammar on the fill: Request.grammar).
Each reply holds at most one call: both models end a call with <|observation|> (`parallel_tool_calls` is read
and has nothing to change). A call is read, never run; one that cannot be read ends its choice with
finish_reason "invalid_tool_call" and an error saying why, the model's text as its content.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from glm_tp.engine.constraints import Grammar, JsonValue, Literal, OneOf, Regex, Sequence
from glm_tp.engine.types import short_repr
from glm_tp.text.tool_calls import PYTHON_CLOSE, PYTHON_OPEN, TOOL_TEMPLATES, call_message, read_reply

MAX_TOOLS = 128                 # as OpenAI's API
MAX_TOOL_CHARS = 32768          # one function's JSON
MAX_CALLS = 16                  # tool_calls in one earlier assistant message
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
FUNCTION_KEYS = ("name", "description", "parameters", "strict")
INVALID = "invalid_tool_call"


class ToolError(ValueError):
    """A tools field that cannot be used: answered as a 400 naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    template: str                   # the model's chat format (chatglm3 or glm4)
    functions: tuple[dict, ...]     # {name, description, parameters} as given, for the prompt
    choice: str                     # none | auto | required | function
    name: str | None = None         # choice "function": the one to call

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f["name"] for f in self.functions)

    @property
    def calls(self) -> bool:
        """Whether the reply may be a call (the context leaves its metadata line to the model)."""
        return self.choice != "none"


# -- the request --------------------------------------------------------------------------------------
def _function(tool: object, where: str, seen: set[str]) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"} or \
            not isinstance(tool.get("function"), dict):
        raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                        f"\"parameters\"}}}}, not {short_repr(tool, 60)}", where)
    function = tool["function"]
    extra = set(function) - set(FUNCTION_KEYS)
    if extra:
        raise ToolError(f"{where}.function has unknown field {sorted(extra)[0]!r}: use {', '.join(FUNCTION_KEYS)}",
                        f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in seen:
        why = "is given twice" if isinstance(name, str) and name in seen else "must be 1 to 64 letters, digits, _ or -"
        raise ToolError(f"{where}.function.name {why}, not {short_repr(name)}", f"{where}.function.name")
    checks = (("description", str, "a string"), ("parameters", dict, "a JSON Schema object"),
              ("strict", bool, "true or false"))
    for key, kind, what in checks:
        if function.get(key) is not None and not isinstance(function[key], kind):
            raise ToolError(f"{where}.function.{key} must be {what}, not {short_repr(function[key])}",
                            f"{where}.function.{key}")
    shown = {k: function[k] for k in function if k != "strict" and function[k] is not None}  # strict: the API's
    if len(json.dumps(shown, ensure_ascii=False)) > MAX_TOOL_CHARS:
        raise ToolError(f"{where}.function is longer than {MAX_TOOL_CHARS} characters as JSON", f"{where}.function")
    seen.add(name)
    return shown


def _choice(value: object, names: tuple[str, ...]) -> tuple[str, str | None]:
    if value in ("none", "auto", "required"):
        return value, None  # type: ignore[return-value]
    name = value.get("function", {}).get("name") if isinstance(value, dict) and \
        value.get("type") == "function" and isinstance(value.get("function"), dict) else None
    if name not in names:
        raise ToolError(f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                        f"\"function\": {{\"name\": ...}}}} naming one of the tools ({', '.join(names)}), "
                        f"not {short_repr(value, 60)}", "tool_choice")
    return "function", name


def parse_tools(body: dict, template: str | None) -> ToolSpec | None:
    """The checked tools, tool_choice and parallel_tool_calls of a chat body; None without tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError(f"parallel_tool_calls must be true or false, not {short_repr(parallel)}",
                        "parallel_tool_calls")
    if tools is None:
        if choice is not None:
            raise ToolError("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    if template not in TOOL_TEMPLATES:
        raise ToolError(f"this model has no tool-call format (its chat format: {template or 'none'}); "
                        f"tools need ChatGLM3's or GLM-4's", "tools")
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise ToolError(f"tools must be a list of 1 to {MAX_TOOLS} tools, not {short_repr(tools, 60)}", "tools")
    seen: set[str] = set()
    functions = tuple(_function(t, f"tools[{k}]", seen) for k, t in enumerate(tools))
    mode, name = _choice("auto" if choice is None else choice, tuple(f["name"] for f in functions))
    return ToolSpec(template, functions, mode, name)  # type: ignore[arg-type]


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def _arguments(call: object, where: str) -> tuple[str, dict]:
    function = call.get("function") if isinstance(call, dict) and call.get("type", "function") == "function" \
        else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(name, str) or not NAME.fullmatch(name) or not isinstance(arguments, str):
        raise ToolError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                        f"\"arguments\": a JSON object's text}}}}, not {short_repr(call, 60)}", where)
    try:
        value = json.loads(arguments, parse_constant=_not_json)
    except (ValueError, RecursionError) as e:
        raise ToolError(f"{where}.function.arguments is not JSON ({e})", f"{where}.function.arguments") from None
    if not isinstance(value, dict):
        raise ToolError(f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
    return name, value


def history(body: dict, messages: list[dict], template: str | None) -> list[dict]:
    """The messages with each earlier assistant call (`tool_calls`) in the model's call format, after the
    message's content; a `tool` message is the model's observation (text/chat.py)."""
    out: list[dict] = []
    for i, (raw, message) in enumerate(zip(body["messages"], messages)):
        calls, where = raw.get("tool_calls"), f"messages[{i}].tool_calls"
        if raw.get("role") == "tool" and not isinstance(raw.get("tool_call_id", ""), str):
            raise ToolError(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
        if calls is None or raw.get("role") != "assistant":
            out.append(message)
            continue
        if template not in TOOL_TEMPLATES:
            raise ToolError(f"{where}: this model has no tool-call format (its chat format: {template or 'none'})",
                            where)
        if not isinstance(calls, list) or len(calls) > MAX_CALLS:
            raise ToolError(f"{where} must be a list of at most {MAX_CALLS} calls", where)
        out += [message] if message["content"].strip() else []
        for j, call in enumerate(calls):
            name, arguments = _arguments(call, f"{where}[{j}]")
            try:
                out.append(call_message(name, arguments, template))
            except ValueError as e:
                raise ToolError(f"{where}[{j}].function.arguments: {e}", f"{where}[{j}].function.arguments") from None
    return out


def chat_options(spec: ToolSpec | None) -> dict:
    """The chat format's tools and whether it leaves the reply's metadata line to the model."""
    return {"tools": list(spec.functions), "open_reply": spec.calls} if spec else {}


# -- forced calls -------------------------------------------------------------------------------------
_STRING = r'"([^"\\\n]|\\.)*"'
_SCALAR = rf'({_STRING}|-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|True|False|None)'
_VALUE = rf'({_SCALAR}|\[({_SCALAR}(, {_SCALAR})*)?\]|\{{({_STRING}: {_SCALAR}(, {_STRING}: {_SCALAR})*)?\}})'


_TYPED = {"string": _STRING, "integer": r"-?(0|[1-9][0-9]*)", "boolean": "(True|False)", "null": "None",
          "number": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"}


def _python_value(schema: object) -> str:
    """A regex of one argument's Python literal under its schema: an enum's or const's values, a scalar type's
    literals; anything else, any flat literal."""
    if not isinstance(schema, dict):
        return _VALUE
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list) and values and all(isinstance(v, (str, int, float, bool)) or v is None for v in values):
        literals = [repr(v) if isinstance(v, bool) or v is None else json.dumps(v, ensure_ascii=False) for v in values]  # True, "text", 3
        return "(" + "|".join(re.escape(v) for v in literals) + ")"
    kind = schema.get("type")
    return _TYPED.get(kind, _VALUE) if isinstance(kind, str) else _VALUE


def _python_kwargs(parameters: dict | None) -> str:
    """A regex of ChatGLM3's keyword arguments under the parameters schema: each property at most once, the
    required ones always and first, each value a Python literal of its own schema. Without properties (or with
    very many), any names with flat literals."""
    props = {p: v for p, v in ((parameters or {}).get("properties") or {}).items() if p.isidentifier()}
    if not props and (parameters or {}).get("additionalProperties") is False:
        return ""  # a function without arguments
    if not props or len(props) > 16:
        name = "(" + "|".join(props) + ")" if props else "[A-Za-z_][A-Za-z0-9_]*"
        return rf"({name}={_VALUE}(, {name}={_VALUE})*)?"
    required = [p for p in props if p in set((parameters or {}).get("required") or [])]
    optional = [f"{p}={_python_value(props[p])}" for p in props if p not in required]
    if required:
        return ", ".join(f"{p}={_python_value(props[p])}" for p in required) + "".join(f"(, {o})?" for o in optional)
    # none required: nothing, or the first argument given, then any of the later ones
    starts = [o + "".join(f"(, {later})?" for later in optional[i + 1:]) for i, o in enumerate(optional)]
    return "(" + "|".join(starts) + ")?"


def _call_grammar(function: dict, template: str) -> Grammar:
    name, parameters = function["name"], function.get("parameters")
    if template == "glm4":
        return Sequence((Literal(f"{name}\n"), JsonValue(parameters)))
    return Sequence((Literal(f"{name}\n{PYTHON_OPEN}"), Regex(_python_kwargs(parameters)), Literal(PYTHON_CLOSE)))


def grammar(spec: ToolSpec | None) -> Grammar | None:
    """What a forced call must look like: one of the tools ("required") or the named one; else None."""
    if spec is None or spec.choice not in ("required", "function"):
        return None
    chosen = [f for f in spec.functions if spec.choice == "required" or f["name"] == spec.name]
    if len(chosen) == 1:
        return _call_grammar(chosen[0], spec.template)
    return OneOf(tuple(_call_grammar(f, spec.template) for f in chosen))


# -- the reply ----------------------------------------------------------------------------------------
def reply_fields(spec: ToolSpec, text: str, finish_reason: str) -> dict:
    """A chat choice's message and finish_reason (and error) when the reply may be a call."""
    reply = read_reply(text, spec.template, spec.names)
    if reply.name is None:
        return {"message": {"role": "assistant", "content": reply.content}}
    if reply.error is None:
        call = {"id": f"call_{secrets.token_hex(12)}", "type": "function",
                "function": {"name": reply.name, "arguments": reply.arguments}}
        return {"message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls" if finish_reason in ("stop", "length") else finish_reason}
    cut = finish_reason == "length"
    return {"message": {"role": "assistant", "content": text}, "finish_reason": "length" if cut else INVALID,
            "error": {"code": INVALID, "message": reply.error + (" (the reply was cut at max_tokens)" if cut else "")}}


def outcome(choice: dict) -> str | None:
    """valid: the choice returned a call; invalid: the model named a tool in a way that could not be read."""
    if choice.get("finish_reason") == "tool_calls":
        return "valid"
    return "invalid" if (choice.get("error") or {}).get("code") == INVALID else None


def _joined(a: dict | None, b: dict | None) -> dict | None:
    """Two chat logprobs bodies as one."""
    if a is None or b is None:
        return a or b
    return {**a, "content": a["content"] + b["content"]}


class StreamRelay:
    """A stream's chunk choices when replies may be calls: a reply's first line is held until it is whole; an
    empty one (a plain reply) lets the content through as it comes; a call is held to its end, then read and
    sent as OpenAI streams calls (index, id, type, name and empty arguments; then the arguments)."""

    def __init__(self, spec: ToolSpec | None, choices: int):
        self.spec = spec if spec is not None and spec.calls else None
        self.text, self.sent = [""] * choices, [""] * choices
        self.held: list[dict | None] = [None] * choices  # logprobs of text not sent yet

    def _content(self, i: int) -> str | None:
        metadata, newline, rest = self.text[i].partition("\n")
        return rest if newline and not metadata.strip() else None

    def delta(self, choice: dict) -> list[dict]:
        """The chunk choices to send for one of new text (or the first, with the role)."""
        if self.spec is None:
            return [choice]
        i, delta = choice["index"], choice["delta"]
        if "role" in delta:  # the first chunk: whether content follows is not known yet
            return [{**choice, "delta": {"role": "assistant"}}]
        self.text[i] += delta.get("content", "")
        logprobs, content = _joined(self.held[i], choice["logprobs"]), self._content(i)
        if content is None:
            self.held[i] = logprobs
            return []
        self.held[i], new, self.sent[i] = None, content[len(self.sent[i]):], content
        return [{**choice, "logprobs": logprobs, "delta": {"content": new} if new else {}}]

    def done(self, choice: dict, text: str) -> list[dict]:
        """The chunk choices that end a choice whose whole generated text is `text`."""
        if self.spec is None:
            return [choice]
        i = choice["index"]
        fields = reply_fields(self.spec, text, choice["finish_reason"])
        message = fields.pop("message")
        end = {**choice, **fields, "logprobs": _joined(self.held[i], choice["logprobs"])}
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            head = {"index": 0, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            arguments = {"index": 0, "function": {"arguments": call["function"]["arguments"]}}
            return [{"index": i, "logprobs": end["logprobs"], "finish_reason": None, "delta": {"tool_calls": [head]}},
                    {"index": i, "logprobs": None, "finish_reason": None, "delta": {"tool_calls": [arguments]}},
                    {**end, "logprobs": None, "delta": {}}]
        content, sent = message["content"] or "", self.sent[i]
        rest = content[len(sent):] if content.startswith(sent) else ""
        return [{**end, "delta": {"content": rest} if rest else {}}]

