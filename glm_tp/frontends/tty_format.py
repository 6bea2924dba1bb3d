"""The TTY's answer format: the `response_format` of the HTTP and batch front ends (structured.py), as a command.

`/format json` (any JSON object), `/format schema {JSON Schema}` (a JSON value under it), `/format regex
PATTERN` (the whole answer matches it) and `/format text` or `/format` alone (no constraint) hold for the
prompts that follow, as /set does: each blank's answer of a GLM prompt, or a causal model's answer, keeps to
the grammar. A format that cannot be used is one error line, and the earlier format stays.
"""
from __future__ import annotations

import json

from glm_tp.engine.constraints import Grammar
from glm_tp.frontends.structured import FormatError, grammar_of

FORMAT_HELP = """  /format json | schema {JSON Schema} | regex PATTERN | text
                   the answers' format from here on (text, or /format alone: free text)"""
KINDS = ("json", "schema", "regex", "text")


def _response_format(kind: str, value: str) -> dict:
    """The response_format object a /format line stands for; raises FormatError."""
    if kind not in KINDS or (kind in ("json", "text") and value):
        raise FormatError(f"/format takes json, schema {{...}}, regex PATTERN or text, not {f'{kind} {value}'.strip()!r}")
    if kind == "schema":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise FormatError(f"/format schema: the schema is not JSON ({e})") from None
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    if kind == "regex":
        return {"type": "regex", "regex": value}
    return {"type": "json_object" if kind == "json" else "text"}


class FormatMode:
    def __init__(self) -> None:
        self.grammar: Grammar | None = None

    def command(self, line: str) -> bool:
        """Handle /format; False when the line is another command."""
        name, _, rest = line.partition(" ")
        if name != "/format":
            return False
        kind, _, value = rest.strip().partition(" ")
        kind, value = kind or "text", value.strip()
        try:
            self.grammar = grammar_of({"response_format": _response_format(kind, value)})
        except FormatError as e:
            print(f"error: {e}")
        else:
            print(f"  format: {kind}" + (f" {value}" if value else ""))
        return True
