"""The JSON schema of the OpenAI request bodies the server publishes at /openapi.json, so schema-driven
clients and fuzzers can use it. Built from the bounds the parser checks (engine/types.LIMITS and
frontends/openai_format's own), so the two cannot drift apart."""
from __future__ import annotations

from glm_tp.engine.types import LIMITS, MAX_LOGPROBS, MAX_SEED, MAX_STOPS, STRATEGIES
from glm_tp.frontends import structured
from glm_tp.frontends.openai_format import MAX_N
from glm_tp.frontends.tools import MAX_CALLS, MAX_TOOLS, NAME

# tools and tool calls (frontends/tools.py)
_name = {"type": "string", "pattern": f"^{NAME.pattern}$"}
_function = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": _name, "description": {"type": "string"}, "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}
_call = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": _name, "arguments": {"type": "string"}}}}}
_tools = {
    "tools": {"type": "array", "minItems": 1, "maxItems": MAX_TOOLS, "items": {
        "type": "object", "required": ["type", "function"], "additionalProperties": False,
        "properties": {"type": {"const": "function"}, "function": _function}}},
    "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                         "properties": {"name": _name}}}}]},
    "parallel_tool_calls": {"type": "boolean"},
}


def request_schema(kind: str) -> dict:
    """The JSON schema of a request body (served in /openapi.json), from the same bounds the parser checks."""
    def integer(lo: float, hi: float) -> dict:
        return {"type": "integer", "minimum": int(lo), "maximum": int(hi)}
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    glm = {name: (integer(limit.lo, limit.hi) if name not in ("temperature", "top_p", "length_penalty") else
                  {"type": "number", "minimum": limit.lo, "maximum": limit.hi,
                   **({"exclusiveMinimum": limit.lo} if limit.lo_open else {})})
           for name, limit in LIMITS.items()}
    glm.update(strategy={"enum": list(STRATEGIES)}, return_all_beams={"type": "boolean"})
    props: dict[str, dict] = {
        "model": {"type": "string"}, "max_tokens": integer(1, LIMITS["max_new_tokens"].hi),
        "max_completion_tokens": integer(1, LIMITS["max_new_tokens"].hi),
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "n": integer(1, MAX_N),
        "seed": integer(0, MAX_SEED), "stream": {"type": "boolean"},
        "stop": {"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "minLength": 1}}]},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "glm": {"type": "object", "properties": glm, "additionalProperties": False},
        "response_format": structured.published_schema(),
    }
    if kind == "completion":
        props.update(
            prompt={"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                              ids, {"type": "array", "minItems": 1, "items": ids}]},
            suffix={"type": "string"}, echo={"type": "boolean"}, logprobs=integer(0, MAX_LOGPROBS))
        required = ["prompt"]
    else:
        content = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}
        props.update(messages={"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"type": "string"}, "content": {"anyOf": [content, {"type": "null"}]},
                           "tool_calls": {"type": "array", "maxItems": MAX_CALLS, "items": _call},
                           "tool_call_id": {"type": "string"}}}},
            logprobs={"type": "boolean"}, top_logprobs=integer(0, MAX_LOGPROBS), **_tools)
        required = ["messages"]
    return {"type": "object", "required": required, "properties": props}
