"""JSONL batch jobs on rank 0: streaming, resumable, one output line per input line.

Input lines are either
  {"id": ..., "prompt": "..."} or {"id": ..., "prompt_token_ids": [...]}, optionally with
  "generation": {...} settings, answered with a plain record; or
  OpenAI batch request lines {"custom_id", "method": "POST", "url": "/v1/completions" |
  "/v1/chat/completions", "body": {...}}, answered in the OpenAI batch output format.
A malformed or invalid line gets an error record naming its line number. Results are appended and
flushed as each line is answered (lines finish out of order: the engine runs many at once); a rerun
skips the lines already in the output, matched by id (the n-th line of an id by its n-th record), so a
killed job loses at most the lines in flight. SIGTERM finishes the lines in flight, then exits cleanly.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.types import GenerationConfig, Request, RequestHandle, Result
from glm_tp.frontends import openai_format
from glm_tp.frontends.openai_format import OpenAIError
from glm_tp.text.chat import ChatFormat


@dataclass
class Item:
    """One input line: a request to run, or an error to record."""

    line: int
    key: str                        # id or custom_id: what resuming matches on
    requests: list[Request]         # several for OpenAI n > 1 or a list of prompts
    openai: dict | None = None      # set for a line of an OpenAI-format file: answered in that format
    error: str | None = None
    parsed: openai_format.Parsed | None = None
    openai_error: OpenAIError | None = None


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _openai_item(number: int, obj: dict, default: GenerationConfig, chat: ChatFormat | None) -> Item:
    key = obj.get("custom_id")
    if not isinstance(key, str) or not key:
        error = OpenAIError(f"custom_id must be a non-empty string, not {key!r}", "custom_id")
        return Item(number, f"line-{number}", [], openai=obj, error=f"line {number}: {error}", openai_error=error)
    try:
        parsed = openai_format.parse_batch_line(number, obj, default, chat)
    except OpenAIError as e:
        return Item(number, key, [], openai=obj, error=f"line {number}: {e}", openai_error=e)
    return Item(number, key, parsed.requests, openai=obj, parsed=parsed)


def _plain_item(number: int, obj: dict, default: GenerationConfig) -> Item:
    key = str(obj.get("id", f"line-{number}"))
    try:
        settings = obj.get("generation")
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"'generation' must be an object of settings such as {{\"strategy\": \"beam\"}}, "
                             f"not {_kind(settings)}")
        config = default.updated(**settings) if settings else default
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"'prompt' must be a string, not {_kind(obj['prompt'])}")
            return Item(number, key, [Request(f"{number}", text=obj["prompt"], config=config)])
        if "prompt_token_ids" in obj:
            ids = obj["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError("'prompt_token_ids' must be a list of integers")
            return Item(number, key, [Request(f"{number}", token_ids=ids, config=config)])
        raise ValueError("a line needs 'prompt', 'prompt_token_ids' or an OpenAI 'custom_id' + 'body'")
    except ValueError as e:
        return Item(number, key, [], error=f"line {number}: {e}")


def parse_line(number: int, text: str, default: GenerationConfig, openai_file: bool = False,
               chat: ChatFormat | None = None) -> Item:
    """One line to an Item; never raises. A line of an OpenAI-format file that cannot be read gets an
    OpenAI error line (custom_id line-N, so resuming skips it)."""
    try:
        obj = json.loads(text)
        problem = None if isinstance(obj, dict) else f"a line must be a JSON object, not {_kind(obj)}"
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e})"
    if problem is not None:
        if openai_file:
            error = OpenAIError(problem, None, code="invalid_json")
            return Item(number, f"line-{number}", [], openai={}, error=f"line {number}: {problem}", openai_error=error)
        return Item(number, f"line-{number}", [], error=f"line {number}: {problem}")
    if "custom_id" in obj or openai_file:
        return _openai_item(number, obj, default, chat)
    return _plain_item(number, obj, default)


def plain_record(item: Item, results: list[Result]) -> dict:
    if item.error:
        return {"id": item.key, "line": item.line, "error": item.error}
    r = results[0]
    record = {"id": item.key, "line": item.line, "text": r.text, "blanks": r.blanks, "token_ids": r.token_ids,
              "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
              "completion_tokens": r.completion_tokens, "error": r.error}
    if r.beams:
        record["beams"] = r.beams
    return record


def is_openai_file(path: Path) -> bool:
    """An OpenAI batch file: its first line that is a JSON object has a custom_id."""
    with path.open(encoding="utf-8") as f:
        for text in f:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return "custom_id" in obj
    return False


# -- OpenAI batch output lines ---------------------------------------------------------------------------
def _ids(key: str, line: int) -> tuple[str, str]:
    digest = hashlib.sha1(f"{key}:{line}".encode()).hexdigest()
    return "batch_req_" + digest[:24], "req_" + digest[24:40]


def openai_error_line(key: str, line: int, error: OpenAIError) -> dict:
    line_id, request_id = _ids(key, line)
    body = error.body()
    body["error"]["message"] = f"line {line}: {error.message}"
    return {"id": line_id, "custom_id": key,
            "response": {"status_code": error.status, "request_id": request_id, "body": body}, "error": None}


def openai_record(item: Item, results: list[Result]) -> dict:
    """The OpenAI batch output line of an item (its response, or its error)."""
    if item.parsed is None:
        error = item.openai_error or OpenAIError(item.error or "invalid line")
        return openai_error_line(item.key, item.line, error)
    line_id, request_id = _ids(item.key, item.line)
    try:
        model = item.parsed.model or "glm-tp"
        body = openai_format.response_body(item.parsed, results, request_id, int(time.time()), model)
    except OpenAIError as e:
        return openai_error_line(item.key, item.line, e)
    return {"id": line_id, "custom_id": item.key,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def read_items(path: Path, default: GenerationConfig, chat: ChatFormat | None = None) -> Iterator[Item]:
    openai_file = is_openai_file(path)
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield parse_line(number, text, default, openai_file, chat)


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
    """How many answers each id already has; a last line cut short by a crash is removed first."""
    if not output.exists():
        return Counter()
    drop_partial_last_line(output)
    keys: Counter[str] = Counter()
    with output.open(encoding="utf-8") as f:
        for text in f:
            obj = json.loads(text)
            keys[str(obj.get("custom_id", obj.get("id")))] += 1
    return keys


def check_output(input_path: Path, output: Path | None) -> Path:
    """The results path, checked before the model loads: its folder is writable, and an existing file is
    a results file (JSON lines with an id), never an unrelated file that appending would spoil."""
    output = output or input_path.with_name(input_path.stem + ".results.jsonl")
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist: give input=PATH.jsonl or input=interactive")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write results to {output}: {folder} is not a writable folder")
    if output.exists():
        with output.open(encoding="utf-8", errors="replace") as f:
            first = f.readline()
        try:
            ok = first == "" or "id" in json.loads(first) or "custom_id" in json.loads(first)
        except (json.JSONDecodeError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{output} exists and is not a glm-tp results file: give another output=PATH")
    return output


def claim_output(output: Path) -> TextIO:
    """The results file opened for appending and locked for this run alone (released when the process ends,
    however it ends): a second run on the same file stops with one line instead of writing beside it."""
    out = output.open("a", encoding="utf-8")
    try:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        out.close()
        raise ValueError(f"{output} is being written by another run (or its ranks are still finishing): "
                         f"wait for it to end, or give another output=PATH") from None
    return out


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True


@dataclass
class _Flight:
    """An item whose requests are in the engine (or were refused at once: their handles are done)."""

    item: Item
    occurrence: int                        # how many earlier lines had the same id
    handles: list[RequestHandle]


class _Writer:
    """Writes each finished line at once; the n-th line of an id is written after the (n-1)-th, so a rerun
    that skips the first `done[id]` lines of each id loses and duplicates nothing."""

    def __init__(self, out, written: Counter[str], stats: dict[str, float]):
        self.out, self.written, self.stats = out, written, stats
        self.held: dict[tuple[str, int], tuple[Item, list[Result]]] = {}

    def put(self, item: Item, occurrence: int, results: list[Result]) -> int:
        """Returns how many lines were written."""
        self.held[(item.key, occurrence)] = (item, results)
        count = 0
        while (item.key, self.written[item.key]) in self.held:
            held_item, held_results = self.held.pop((item.key, self.written[item.key]))
            self._write(held_item, held_results)
            self.written[item.key] += 1
            count += 1
        return count

    def _write(self, item: Item, results: list[Result]) -> None:
        record = openai_record(item, results) if item.openai is not None else plain_record(item, results)
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        failed = item.error is not None or any(r.error for r in results)
        self.stats["failed" if failed else "done"] += 1
        self.stats["tokens"] += sum(r.completion_tokens for r in results)


def run_batch(coordinator: Coordinator, input_path: Path, output: Path | None = None,
              claimed: TextIO | None = None) -> dict[str, float]:
    """Stream the input through the engine, keeping it full: new lines are admitted as rows free up, and
    each line's record is written as soon as it is answered. SIGTERM: take no new lines, finish those in
    flight, write the summary. `claimed`: the output as `claim_output` opened it (else it is claimed here)."""
    output = check_output(input_path, output)
    out = claimed or claim_output(output)
    done = done_keys(output)  # under the lock: no other run appends meanwhile
    stats = {"done": 0, "failed": 0, "skipped": 0, "tokens": 0}
    start = time.time()
    with out:
        feed = _Feed(coordinator, input_path, done, _Writer(out, Counter(done), stats))
        coordinator.run(feed.poll)
    feed.bar.close()
    stats["seconds"] = round(time.time() - start, 2)
    note = " (stopped by SIGTERM: the lines in flight were finished)" if feed.stop.requested else ""
    print(f"batch summary: {stats['done']} done, {stats['failed']} failed, {stats['skipped']} skipped "
          f"(already in {output}), {stats['tokens']} tokens, {stats['seconds']} s{note}", flush=True)
    return stats


class _Feed:
    """Between engine steps: write the lines that are answered, and submit new ones while fewer than a full
    engine and a queue to refill it are in flight."""

    def __init__(self, coordinator: Coordinator, input_path: Path, done: Counter[str], writer: _Writer):
        self.coordinator, self.input_path, self.done, self.writer = coordinator, input_path, done, writer
        self.items = read_items(input_path, coordinator.default, coordinator.chat_format)
        self.target = 2 * coordinator.max_batch
        self.seen: Counter[str] = Counter()
        self.flights: list[_Flight] = []
        self.exhausted = False
        self.stop = _Stop()
        self.bar = tqdm(desc="prompts", unit="prompt")
        self.start = time.time()

    def poll(self) -> bool:
        """True once every line is written (or SIGTERM came and the lines in flight are)."""
        self.flights = _write_finished(self.flights, self.writer, self.bar)
        while not (self.exhausted or self.stop.requested) and sum(len(f.handles) for f in self.flights) < self.target:
            item = next(self.items, None)
            if item is None:
                self.exhausted = True
                break
            self._admit(item)
        elapsed = max(time.time() - self.start, 1e-9)
        stats = self.writer.stats
        self.bar.set_postfix(prompts_s=f"{self.bar.n / elapsed:.2f}", tokens_s=f"{stats['tokens'] / elapsed:.1f}")
        return not self.flights and (self.exhausted or self.stop.requested)

    def _admit(self, item: Item) -> None:
        occurrence = self.seen[item.key]
        self.seen[item.key] += 1
        if occurrence == 1:
            tqdm.write(f"warning: id {item.key!r} appears more than once in {self.input_path}: every line is "
                       f"answered", file=sys.stderr)
        if occurrence < self.done[item.key]:
            self.writer.stats["skipped"] += 1
            return
        handles = [self.coordinator.submit(r, limit=False) for r in item.requests]
        self.flights.append(_Flight(item, occurrence, handles))


def _write_finished(flights: list[_Flight], writer: _Writer, bar: tqdm) -> list[_Flight]:
    """Write the lines whose requests all ended; returns those still running."""
    running = []
    for flight in flights:
        if all(h.done for h in flight.handles):
            results = [h.result() for h in flight.handles]
            bar.update(writer.put(flight.item, flight.occurrence, results))
        else:
            running.append(flight)
    return running
