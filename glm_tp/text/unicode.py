"""Text at the edges: a string UTF-8 cannot hold is refused where it comes in, naming the field.

JSON's `\\ud800` escapes, and bytes that are not UTF-8 read with Python's surrogateescape, give strings
with lone surrogates. Nothing downstream can use them: the tokenizer fails on them, and so would writing
them to a results file or a response. So every front end checks its text once, as it parses it.
"""
from __future__ import annotations


class TextError(ValueError):
    """Text that UTF-8 cannot hold; `field` names where it was (`prompt`, `body.messages[0].content`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_text(value: str, field: str) -> str:
    """`value` when UTF-8 can hold it; raises TextError naming `field` and the character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TextError(f"{field}: character {e.start} is U+{ord(value[e.start]):04X}, a lone surrogate (a "
                        f"\\ud800-style escape, or bytes that are not UTF-8), which UTF-8 cannot hold: send valid "
                        f"UTF-8 text", field) from None
    return value


def check_strings(value: object, field: str) -> None:
    """Every string in a parsed JSON value, keys included; raises TextError naming the first bad one by its
    path (`body.messages[0].content`). Walks with a stack: JSON nests deeper than Python recurses."""
    stack: list[tuple[object, str]] = [(value, field)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                name = check_text(key, f"a key in {path or 'the object'}")
                stack.append((child, f"{path}.{name}" if path else name))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item))))
