"""JSONL batch jobs on rank 0: streaming, resumable, one output line per input line.

Input lines are either
  {"id": ..., "prompt": "..."} or {"id": ..., "prompt_token_ids": [...]}, optionally with
  "generation": {...} settings, answered with a plain record; or
  OpenAI batch request lines {"custom_id", "method": "POST", "url": "/v1/completions" |
  "/v1/chat/completions", "body": {...}}, answered in the OpenAI batch output format.
A malformed or invalid line gets an error record naming its line number. Results are appended and
flushed line by line; a rerun skips ids already in the output, so a killed job loses at most the batch
in flight. SIGTERM finishes the current batch, then exits cleanly.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from ..requests import GenerationConfig, Request, Result
from ..serve import Coordinator
from . import openai_format


@dataclass
class Item:
    """One input line: a request to run, or an error to record."""

    line: int
    key: str                        # id or custom_id: what resuming matches on
    requests: list[Request]         # several for OpenAI n > 1 or a list of prompts
    openai: dict | None = None      # set for a line of an OpenAI-format file: answered in that format
    error: str | None = None
    parsed: openai_format.Parsed | None = None
    openai_error: openai_format.OpenAIError | None = None


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _openai_item(number: int, obj: dict, default: GenerationConfig) -> Item:
    key = obj.get("custom_id")
    if not isinstance(key, str) or not key:
        error = openai_format.OpenAIError(f"custom_id must be a non-empty string, not {key!r}", "custom_id")
        return Item(number, f"line-{number}", [], openai=obj, error=f"line {number}: {error}", openai_error=error)
    try:
        parsed = openai_format.parse_batch_line(number, obj, default)
    except openai_format.OpenAIError as e:
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


def parse_line(number: int, text: str, default: GenerationConfig, openai_file: bool = False) -> Item:
    """One line to an Item; never raises. A line of an OpenAI-format file that cannot be read gets an
    OpenAI error line (custom_id line-N, so resuming skips it)."""
    try:
        obj = json.loads(text)
        problem = None if isinstance(obj, dict) else f"a line must be a JSON object, not {_kind(obj)}"
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e})"
    if problem is not None:
        if openai_file:
            error = openai_format.OpenAIError(problem, None, code="invalid_json")
            return Item(number, f"line-{number}", [], openai={}, error=f"line {number}: {problem}", openai_error=error)
        return Item(number, f"line-{number}", [], error=f"line {number}: {problem}")
    if "custom_id" in obj or openai_file:
        return _openai_item(number, obj, default)
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


def read_items(path: Path, default: GenerationConfig) -> Iterator[Item]:
    openai_file = is_openai_file(path)
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield parse_line(number, text, default, openai_file)


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


def done_keys(output: Path) -> set[str]:
    """Ids already answered; a last line cut short by a crash is removed first."""
    if not output.exists():
        return set()
    drop_partial_last_line(output)
    keys = set()
    with output.open(encoding="utf-8") as f:
        for text in f:
            obj = json.loads(text)
            keys.add(str(obj.get("custom_id", obj.get("id"))))
    return keys


def _pending(items: Iterator[Item], skip: set[str], stats: dict[str, float]) -> Iterator[Item]:
    for item in items:
        if item.key in skip:
            stats["skipped"] += 1
            continue
        yield item


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True


def run_batch(coordinator: Coordinator, input_path: Path, output: Path | None = None) -> dict[str, float]:
    if not input_path.is_file():
        raise ValueError(f"input file {input_path} does not exist: give input=PATH.jsonl or input=interactive")
    output = output or input_path.with_name(input_path.stem + ".results.jsonl")
    skip = done_keys(output)
    stop = _Stop()
    default = coordinator.engine.default
    stats = {"done": 0, "failed": 0, "skipped": 0, "tokens": 0}
    start = time.time()
    bar = tqdm(desc="prompts", unit="prompt")
    items = _pending(read_items(input_path, default), skip, stats)
    with output.open("a", encoding="utf-8") as out:
        while not stop.requested:
            batch: list[Item] = []
            for item in items:
                batch.append(item)
                if sum(len(i.requests) for i in batch) >= coordinator.engine.max_batch:
                    break
            if not batch:
                break
            requests = [r for i in batch for r in i.requests]
            results = coordinator.generate(requests) if requests else []
            by_id = {r.id: r for r in results}
            for item in batch:
                mine = [by_id[r.id] for r in item.requests]
                record = openai_format.output_line(item, mine) if item.openai is not None else plain_record(item, mine)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                failed = item.error is not None or any(r.error for r in mine)
                stats["failed" if failed else "done"] += 1
                stats["tokens"] += sum(r.completion_tokens for r in mine)
            bar.update(len(batch))
            elapsed = max(time.time() - start, 1e-9)
            bar.set_postfix(prompts_s=f"{bar.n / elapsed:.2f}", tokens_s=f"{stats['tokens'] / elapsed:.1f}")
    bar.close()
    stats["seconds"] = round(time.time() - start, 2)
    note = " (stopped by SIGTERM after the current batch)" if stop.requested else ""
    print(f"batch summary: {stats['done']} done, {stats['failed']} failed, {stats['skipped']} skipped "
          f"(already in {output}), {stats['tokens']} tokens, {stats['seconds']} s{note}", flush=True)
    return stats
