"""`response_format`: what every answer of a body must look like, read into a `Grammar` and checked here.

OpenAI's forms: {"type": "text"} (no constraint), {"type": "json_object"} (any JSON object) and
{"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (a JSON value under the schema), and
glm-tp's own {"type": "regex", "regex": "<pattern>"} (the whole answer matches the pattern). The grammar
applies to each fill: a causal model's answer, or each blank's answer of a GLM prompt with [MASK]/[gMASK].
Plain JSONL lines take the same field. A grammar that does not compile (a bad schema or pattern), or no
grammar library, is an error naming response_format.
"""
from __future__ import annotations

import json

from glm_tp.engine import grammar as grammars
from glm_tp.engine.constraints import ConstraintError, Grammar, JsonValue, Regex
from glm_tp.engine.types import Request, short_repr

FIELD = "response_format"
TYPES = ("text", "json_object", "json_schema", "regex")
MAX_CHARS = 65536  # a schema (as JSON) or a pattern: more is no answer format but a denial of service


class FormatError(ValueError):
    """A response_format that cannot be used, in one line that names it (an OpenAI error's param: FIELD)."""


def published_schema() -> dict:
    """response_format's JSON schema, for the server's /openapi.json."""
    return {"anyOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"}, "json_schema": {"type": "object", "properties": {
                "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": "boolean"}}}}},
        {"type": "object", "required": ["type", "regex"], "properties": {
            "type": {"const": "regex"}, "regex": {"type": "string", "minLength": 1, "maxLength": MAX_CHARS}}}]}


def grammar_of(body: dict) -> Grammar | None:
    """The grammar of a body's response_format (None: no constraint); raises FormatError naming the field."""
    value = body.get(FIELD)
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in TYPES:
        raise _error(f"must be an object whose type is one of {', '.join(TYPES)}, not {short_repr(value, 60)}")
    kind = value["type"]
    if kind == "text":
        grammar: Grammar | None = None
    elif kind == "json_object":
        grammar = JsonValue(None)
    elif kind == "json_schema":
        grammar = JsonValue(_schema(value.get("json_schema")))
    else:
        pattern = value.get("regex")
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_CHARS:
            raise _error(f"must be a pattern of 1 to {MAX_CHARS} characters, not {short_repr(pattern, 60)}", "regex")
        grammar = Regex(pattern)
    if grammar is not None:
        try:
            grammars.library()
        except ConstraintError:
            raise _error(f"needs the grammar library: {grammars.INSTALL}") from None
        try:
            grammars.check(grammar)
        except ConstraintError as e:
            raise _error(f"does not compile: {e}", _where(kind)) from None
    return grammar


def constrain(body: dict, requests: list[Request]) -> None:
    """Sets every request's grammar from the body's response_format; raises FormatError naming the field."""
    grammar = grammar_of(body)
    for request in requests:
        request.grammar = grammar


def _schema(spec: object) -> dict | None:
    if not isinstance(spec, dict):
        raise _error(f"must be an object such as {{\"name\": \"answer\", \"schema\": {{...}}}}, "
                     f"not {short_repr(spec, 60)}", "json_schema")
    for name, kind, called in (("name", str, "string"), ("description", str, "string"), ("strict", bool, "boolean")):
        if spec.get(name) is not None and not isinstance(spec[name], kind):
            raise _error(f"must be a {called}, not {short_repr(spec[name], 60)}", f"json_schema.{name}")
    schema = spec.get("schema")
    if schema is None:
        return None  # OpenAI's schema is optional: any JSON object
    if not isinstance(schema, dict):
        raise _error(f"must be a JSON Schema object, not {short_repr(schema, 60)}", "json_schema.schema")
    try:  # a body's parser takes NaN and 1e999, which JSON (and so a schema) has no number for
        text = json.dumps(schema, allow_nan=False)
    except ValueError:
        raise _error("holds NaN or an infinite number, which are no JSON numbers", "json_schema.schema") from None
    if len(text) > MAX_CHARS:
        raise _error(f"is more than {MAX_CHARS} characters as JSON", "json_schema.schema")
    return schema


def _where(kind: str) -> str | None:
    return {"json_schema": "json_schema.schema", "regex": "regex"}.get(kind)


def _error(message: str, inner: str | None = None) -> FormatError:
    """An error naming the field (and the part of it) the message is about."""
    return FormatError(f"{FIELD}.{inner} {message}" if inner else f"{FIELD} {message}")
