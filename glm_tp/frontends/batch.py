"""JSONL batch jobs on rank 0: streaming, resumable, one output line per input line.

Input lines are either
  {"id": ..., "prompt": "..."} or {"id": ..., "prompt_token_ids": [...]}, optionally with
  "generation": {...} settings and a "response_format" (frontends/structured.py), answered with a plain
  record; or
  OpenAI batch request lines {"custom_id", "method": "POST", "url": "/v1/completions" |
  "/v1/chat/completions", "body": {...}}, answered in the OpenAI batch output format.
An id is a string or an integer and comes back as given. A line that cannot be read (not UTF-8, not JSON,
text UTF-8 cannot hold) or is invalid, and a prompt the engine refuses, get an error record that starts
`line N:`; blank lines get none, and the summary counts them. Results are appended and flushed as each
line is answered (lines finish out of order: the engine runs many at once); a rerun skips the lines
already in the output, matched by id (the n-th line of an id by its n-th record; results_file.py), so a
killed job loses at most the lines in flight. SIGTERM finishes the lines in flight, then exits cleanly.
"""
from __future__ import annotations

import hashlib
import json
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
from glm_tp.frontends import openai_format, openai_responses, structured
from glm_tp.frontends.jsonl import Line, given_id, key_text, load, read_lines
from glm_tp.frontends.openai_format import OpenAIError
from glm_tp.frontends.results_file import check_output, claim_output, done_keys
from glm_tp.text.chat import ChatFormat
from glm_tp.text.unicode import TextError, check_strings


@dataclass
class Item:
    """One input line: a request to run, or an error to record (a blank line: neither)."""

    line: int
    own_id: str | int | None        # the line's own id as given (jsonl.given_id); None: it has none
    requests: list[Request]         # several for OpenAI n > 1 or a list of prompts
    openai: dict | None = None      # set for a line of an OpenAI-format file: answered in that format
    error: str | None = None
    parsed: openai_format.Parsed | None = None
    openai_error: OpenAIError | None = None
    blank: bool = False

    @property
    def given(self) -> str | int:
        """The id its record carries."""
        return f"line-{self.line}" if self.own_id is None else self.own_id

    @property
    def key(self) -> str:
        """What resuming matches on (as jsonl.line_key)."""
        return key_text(self.given)


def _kind(value: object) -> str:
    names = {list: "a list", dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), f"a number ({value!r})")


def _own_id(obj: object) -> str | int | None:
    return given_id(obj) if isinstance(obj, dict) else None


def _openai_item(number: int, obj: dict, default: GenerationConfig, chat: ChatFormat | None) -> Item:
    key = obj.get("custom_id")
    if not isinstance(key, str) or not key:
        hint = " (a plain {\"id\", \"prompt\"} line: every line of an OpenAI-format file must be an OpenAI " \
               "batch request)" if "custom_id" not in obj else ""
        error = OpenAIError(f"custom_id must be a non-empty string, not {key!r}{hint}", "custom_id")
        return Item(number, _own_id(obj), [], openai=obj, error=f"line {number}: {error}", openai_error=error)
    try:
        parsed = openai_format.parse_batch_line(number, obj, default, chat)
    except OpenAIError as e:
        return Item(number, _own_id(obj), [], openai=obj, error=f"line {number}: {e}", openai_error=e)
    return Item(number, _own_id(obj), parsed.requests, openai=obj, parsed=parsed)


def _plain_request(number: int, obj: dict, default: GenerationConfig) -> Request:
    """The request of a plain line; raises ValueError naming the field."""
    if "id" in obj and given_id(obj) is None:
        raise ValueError(f"'id' must be a string or an integer, not {_kind(obj['id'])}")
    settings = obj.get("generation")
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"'generation' must be an object of settings such as {{\"strategy\": \"beam\"}}, "
                         f"not {_kind(settings)}")
    config = default.updated(**settings) if settings else default
    grammar = structured.grammar_of(obj)  # its FormatError is a ValueError naming response_format
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise ValueError(f"'prompt' must be a string, not {_kind(obj['prompt'])}")
        return Request(f"{number}", text=obj["prompt"], config=config, grammar=grammar)
    if "prompt_token_ids" in obj:
        ids = obj["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("'prompt_token_ids' must be a list of integers")
        return Request(f"{number}", token_ids=ids, config=config, grammar=grammar)
    raise ValueError("a line needs 'prompt', 'prompt_token_ids' or an OpenAI 'custom_id' + 'body'")


def parse_line(number: int, text: str, default: GenerationConfig, openai_file: bool = False,
               chat: ChatFormat | None = None) -> Item:
    """One line to an Item; never raises. A line of an OpenAI-format file that cannot be read gets an
    OpenAI error line (custom_id: its own when it has one, else line-N, so resuming skips it)."""
    obj, problem = load(text)
    param, code = None, "invalid_json"
    if problem is None and not isinstance(obj, dict):
        problem = f"a line must be a JSON object, not {_kind(obj)}"
    elif problem is None:
        try:
            check_strings(obj, "")  # here, not in the tokenizer or the output file: the line is named
        except TextError as e:
            problem, param, code = str(e), e.field, "invalid_value"
    if problem is not None or not isinstance(obj, dict):
        openai = openai_file or (isinstance(obj, dict) and "custom_id" in obj)
        error = OpenAIError(problem or "", param, code=code) if openai else None
        return Item(number, _own_id(obj), [], openai={} if openai else None, error=f"line {number}: {problem}",
                    openai_error=error)
    if "custom_id" in obj or openai_file:
        return _openai_item(number, obj, default, chat)
    try:
        return Item(number, _own_id(obj), [_plain_request(number, obj, default)])
    except ValueError as e:
        return Item(number, _own_id(obj), [], error=f"line {number}: {e}")


def _line_item(line: Line, default: GenerationConfig, openai_file: bool, chat: ChatFormat | None) -> Item:
    if line.text is None:
        error = OpenAIError(line.error or "", None, code="invalid_encoding") if openai_file else None
        return Item(line.number, None, [], openai={} if openai_file else None,
                    error=f"line {line.number}: {line.error}", openai_error=error)
    if not line.text.strip():
        return Item(line.number, None, [], blank=True)
    return parse_line(line.number, line.text, default, openai_file, chat)


def read_items(path: Path, default: GenerationConfig, chat: ChatFormat | None = None) -> Iterator[Item]:
    openai_file = is_openai_file(path)
    for line in read_lines(path):
        yield _line_item(line, default, openai_file, chat)


def is_openai_file(path: Path) -> bool:
    """An OpenAI batch file: its first line that is a JSON object has a custom_id."""
    for line in read_lines(path):
        obj = load(line.text)[0] if line.text is not None else None
        if isinstance(obj, dict):
            return "custom_id" in obj
    return False


def plain_record(item: Item, results: list[Result]) -> dict:
    if item.error:
        return {"id": item.given, "line": item.line, "error": item.error}
    r = results[0]
    record = {"id": item.given, "line": item.line, "text": r.text, "blanks": r.blanks, "token_ids": r.token_ids,
              "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
              "completion_tokens": r.completion_tokens, "error": f"line {item.line}: {r.error}" if r.error else None}
    if r.beams:
        record["beams"] = r.beams
    if r.logprobs is not None:  # asked for with generation.logprobs: each generated token, in order
        record["logprobs"] = [{"token_id": lp.token_id, "token": lp.token, "logprob": lp.logprob,
                               "top": [{"token_id": i, "token": t, "logprob": v} for i, t, v in lp.top]}
                              for lp in r.logprobs]
    return record


# -- OpenAI batch output lines ---------------------------------------------------------------------------
def _ids(key: str, line: int) -> tuple[str, str]:
    digest = hashlib.sha1(f"{key}:{line}".encode()).hexdigest()
    return "batch_req_" + digest[:24], "req_" + digest[24:40]


def openai_error_line(item: Item, error: OpenAIError) -> dict:
    line_id, request_id = _ids(item.key, item.line)
    body = error.body()
    body["error"]["message"] = f"line {item.line}: {error.message}"
    return {"id": line_id, "custom_id": item.given,
            "response": {"status_code": error.status, "request_id": request_id, "body": body}, "error": None}


def openai_record(item: Item, results: list[Result]) -> dict:
    """The OpenAI batch output line of an item (its response, or its error)."""
    if item.parsed is None:
        return openai_error_line(item, item.openai_error or OpenAIError(item.error or "invalid line"))
    line_id, request_id = _ids(item.key, item.line)
    try:
        model = item.parsed.model or "glm-tp"
        body = openai_responses.response_body(item.parsed, results, request_id, int(time.time()), model)
    except OpenAIError as e:
        return openai_error_line(item, e)
    return {"id": line_id, "custom_id": item.given,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


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
    that skips the first `done[id]` lines of each id loses and duplicates nothing. A failed write (a full
    disk) ends the job with one line: retrying would keep every later record in memory."""

    def __init__(self, out: TextIO, output: Path, written: Counter[str], stats: dict[str, float]):
        self.out, self.output, self.written, self.stats = out, output, written, stats
        self.held: dict[tuple[str, int], tuple[Item, list[Result]]] = {}
        self.broken = False

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
        try:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.out.flush()
        except OSError as e:
            self.broken = True
            raise ValueError(f"cannot write results to {self.output}: {e.strerror or e}: free some space or give "
                             f"another output=PATH; a rerun resumes after the lines written") from None
        failed = item.error is not None or any(r.error for r in results)
        self.stats["failed" if failed else "done"] += 1
        self.stats["tokens"] += sum(r.completion_tokens for r in results)

    def close(self) -> None:
        try:
            self.out.close()
        except OSError:
            if not self.broken:  # else the failed write was reported, and closing only tried it again
                raise


def run_batch(coordinator: Coordinator, input_path: Path, output: str | Path | None = None,
              claimed: TextIO | None = None) -> dict[str, float]:
    """Stream the input through the engine, keeping it full: new lines are admitted as rows free up, and
    each line's record is written as soon as it is answered. SIGTERM: take no new lines, finish those in
    flight, write the summary. `claimed`: the output as `claim_output` opened it (else it is claimed here)."""
    output = check_output(input_path, output)
    out = claimed or claim_output(output)
    try:
        done = done_keys(output)  # under the lock: no other run appends meanwhile
    except ValueError:
        out.close()
        raise
    stats = {"done": 0, "failed": 0, "skipped": 0, "blank": 0, "tokens": 0}
    start = time.time()
    writer = _Writer(out, output, Counter(done), stats)
    feed = _Feed(coordinator, input_path, done, writer)
    try:
        coordinator.run(feed.poll)
    finally:
        feed.bar.close()
        writer.close()
    stats["seconds"] = round(time.time() - start, 2)
    note = " (stopped by SIGTERM: the lines in flight were finished)" if feed.stop.requested else ""
    blank = f", {stats['blank']} blank line(s) (no record)" if stats["blank"] else ""
    print(f"batch summary: {stats['done']} done, {stats['failed']} failed, {stats['skipped']} skipped "
          f"(already in {output}){blank}, {stats['tokens']} tokens, {stats['seconds']} s{note}", flush=True)
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
        if item.blank:
            self.writer.stats["blank"] += 1
            return
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
