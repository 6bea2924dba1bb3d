"""The results file of a JSONL batch job: checked before the model loads, claimed for one run, read back
when a job resumes.

An existing file is appended to only when it holds results of this input: its first record is a glm-tp
record (plain: `id`, `line` and `error`; OpenAI: `custom_id`, `response` and a `batch_req_` id) whose key
is the key of a line of the input (of the line it names, for a plain record). Anything else is refused in
one line and never written: the input itself, an unrelated JSONL file, another input's results, a folder
(or a path ending in `/`), a device such as /dev/null or /dev/full, a file under /proc or /sys.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from pathlib import Path
from typing import TextIO

from glm_tp.frontends.jsonl import key_of_line, read_lines, record_key

SYSTEM = (Path("/proc"), Path("/sys"))
MAX_FIRST_LINE = 1 << 24  # a first line longer than this is no results record
PARTIAL_RECORD = b'{"id": '  # how every record begins: a first line cut by a crash still reads as ours


def check_output(input_path: Path, output: str | Path | None) -> Path:
    """The results path (default: next to the input, NAME.results.jsonl), checked before the model loads;
    raises ValueError saying what to give instead. `output` as the user wrote it: a trailing `/` counts."""
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist: give input=PATH.jsonl or input=interactive")
    if output is None or str(output) == "":
        return _check_path(input_path, input_path.with_name(input_path.stem + ".results.jsonl"))
    text = str(output)
    if text.endswith(("/", os.sep)):
        raise ValueError(f"output={text} names a folder: give a file in it, such as output={text}results.jsonl")
    return _check_path(input_path, Path(text))


def _check_path(input_path: Path, path: Path) -> Path:
    resolved = path.resolve()
    if any(resolved == s or s in resolved.parents for s in SYSTEM):
        raise ValueError(f"cannot write results to {path}: it is a system file (under /proc or /sys): "
                         f"give another output=PATH")
    if path.is_dir():
        raise ValueError(f"output {path} is a folder: give a file in it, such as output={path / 'results.jsonl'}")
    if path.exists():
        if not path.is_file():
            raise ValueError(f"output {path} is not a regular file (a device or a pipe): give a file path")
        if path.samefile(input_path):
            raise ValueError(f"output {path} is the input file: give another output=PATH")
        try:
            _check_results(input_path, path)
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror or e}: give another output=PATH") from None
        return path
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write results to {path}: {folder} is not a writable folder")
    return path


def _check_results(input_path: Path, path: Path) -> None:
    """An existing output must hold results of this input (see the module's docstring)."""
    with path.open("rb") as f:
        first = f.readline(MAX_FIRST_LINE)
    record = _loads(first)
    if not first or (record is None and first.startswith(PARTIAL_RECORD) and not first.endswith(b"\n")):
        return  # empty, or only a first record that a crash cut short (resuming drops it)
    if not isinstance(record, dict) or not _is_record(record):
        raise ValueError(f"{path} exists and is not a glm-tp results file: give another output=PATH")
    if not _from_input(record, input_path):
        raise ValueError(f"{path} holds results of another input (its first record, {record_key(record)!r}, "
                         f"is no line of {input_path}): give another output=PATH, or delete it to start over")


def _loads(raw: bytes) -> object:
    """A line's JSON value; None when it has none."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _is_record(record: dict) -> bool:
    if "custom_id" in record:
        return "response" in record and str(record.get("id", "")).startswith("batch_req_")
    return "id" in record and "error" in record and isinstance(record.get("line"), int)


def _from_input(record: dict, input_path: Path) -> bool:
    """Whether a line of the input has the record's key (a plain record: the line it names)."""
    key, number = record_key(record), None if "custom_id" in record else record["line"]
    for line in read_lines(input_path):
        if number is None or line.number == number:
            if key_of_line(line) == key:
                return True
            if number is not None:
                return False
    return False


def claim_output(output: Path) -> TextIO:
    """The results file opened for appending and locked for this run alone (released when the process ends,
    however it ends): a second run on the same file stops with one line instead of writing beside it."""
    try:
        out = output.open("a", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot write results to {output}: {e.strerror or e}: give another output=PATH") from None
    try:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        out.close()
        raise ValueError(f"{output} is being written by another run (or its ranks are still finishing): "
                         f"wait for it to end, or give another output=PATH") from None
    return out


def drop_partial_last_line(output: Path, chunk: int = 1 << 16) -> None:
    """Cut a last line that a crash left without its newline (reads only the file's tail)."""
    with output.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            if pos == end and data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


def done_keys(output: Path) -> Counter[str]:
    """How many answers each key already has; a last line cut short by a crash is removed first. A line that
    is no record stops the job with the file and the line named (resuming past it could answer twice)."""
    if not output.exists():
        return Counter()
    drop_partial_last_line(output)
    keys: Counter[str] = Counter()
    with output.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            record = _loads(raw)
            if not isinstance(record, dict) or not ("custom_id" in record or "id" in record):
                raise ValueError(f"{output} line {number} is not a results record: fix or delete that line, or "
                                 f"give another output=PATH")
            keys[record_key(record)] += 1
    return keys
