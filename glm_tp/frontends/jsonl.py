"""JSONL files one line at a time, and the key that matches an input line to its record.

Bytes are decoded line by line, so a line that is not UTF-8 is named and the lines around it still read;
a UTF-8 byte order mark at the start of the file is ignored. A line's key is its own id (`custom_id` for
an OpenAI batch line, else `id`: a string or an integer, kept as given in its record) or `line-N` when it
has none that can be used; resuming a job counts the records of each key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BOM = b"\xef\xbb\xbf"


@dataclass
class Line:
    number: int                 # from 1
    text: str | None            # None when the bytes are not UTF-8
    error: str | None = None    # why text is None


def read_lines(path: Path) -> Iterator[Line]:
    """Every line of the file (blank ones too), decoded on its own."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                line = Line(number, raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                line = Line(number, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                          f"the line): save the file as UTF-8")
            yield line


def load(text: str) -> tuple[object, str | None]:
    """A line's JSON value, or why it has none."""
    try:
        return json.loads(text), None
    except (ValueError, RecursionError) as e:  # also an integer of over 4300 digits, or nesting too deep
        return None, f"not valid JSON ({e})"


def given_id(obj: dict) -> str | int | None:
    """The line's own id as given (custom_id when the line has one, else id), or None when there is none
    that can be used: absent, of another type, or text that UTF-8 cannot hold."""
    if "custom_id" in obj:
        value = obj["custom_id"]
        ok = isinstance(value, str) and value != ""
    else:
        value = obj.get("id")
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    if isinstance(value, str) and ok:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            ok = False
    return value if ok else None  # type: ignore[return-value]


def key_text(value: str | int) -> str:
    return value if isinstance(value, str) else str(value)


def line_key(number: int, obj: object) -> str:
    """What resuming matches a line by: its id, else `line-N`."""
    given = given_id(obj) if isinstance(obj, dict) else None
    return f"line-{number}" if given is None else key_text(given)


def key_of_line(line: Line) -> str:
    """The key of an input line as read from the file."""
    obj = load(line.text)[0] if line.text is not None else None
    return line_key(line.number, obj)


def record_key(record: dict) -> str:
    """The key of a record in a results file (an OpenAI line's custom_id, else its id)."""
    value = record["custom_id"] if "custom_id" in record else record.get("id")
    return key_text(value) if isinstance(value, (str, int)) else str(value)
