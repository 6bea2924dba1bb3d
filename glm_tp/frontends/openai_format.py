"""OpenAI batch lines: request bodies to glm-tp requests, results to batch output lines.

Supported urls: /v1/completions (body.prompt) and /v1/chat/completions (body.messages, whose
contents are joined one per line; GLM-130B is not a chat model, so this is plain infilling).
Body keys used: max_tokens, temperature (0 = greedy), top_p, n (n draws with seeds seed..seed+n-1),
stop (the answer is cut at the first stop string), seed; GLM extras: any GenerationConfig key under
"glm" (e.g. {"glm": {"strategy": "beam", "num_beams": 4}}).
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from ..requests import GenerationConfig, Request, Result

if TYPE_CHECKING:
    from .batch import Item

URLS = ("/v1/completions", "/v1/chat/completions")


def _prompt(url: str, body: dict) -> str:
    if url == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("body.prompt must be a string")
        return prompt
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("body.messages must be a non-empty list")
    return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))


def to_requests(line: int, obj: dict, default: GenerationConfig) -> list[Request]:
    url, body = obj.get("url"), obj.get("body")
    if obj.get("method", "POST") != "POST":
        raise ValueError("method must be POST")
    if url not in URLS:
        raise ValueError(f"url {url!r} is not supported: use {' or '.join(URLS)}")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    prompt = _prompt(url, body)
    changes: dict[str, object] = dict(body.get("glm", {}))
    if "max_tokens" in body:
        changes["max_new_tokens"] = body["max_tokens"]
    if "temperature" in body:
        if float(body["temperature"]) == 0:
            changes["strategy"] = "greedy"
        else:
            changes.update(strategy="sample", temperature=body["temperature"])
    if "top_p" in body:
        changes["top_p"] = body["top_p"]
        changes.setdefault("strategy", "sample")
    if "seed" in body:
        changes["seed"] = body["seed"]
    config = default.updated(**changes)
    n = int(body.get("n", 1))
    if not 1 <= n <= 16:
        raise ValueError("n must be between 1 and 16")
    return [Request(f"{line}.{k}", text=prompt, config=config.updated(seed=config.seed + k)) for k in range(n)]


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _answer(result: Result, prompt_has_mask: bool) -> str:
    """A continuation ([gMASK] appended) answers with the blank; an infilling prompt with the full text."""
    return result.text if prompt_has_mask else "".join(result.blanks)


def output_line(item: "Item", results: list[Result]) -> dict:
    obj = item.openai or {}
    url, body = obj.get("url"), obj.get("body") if isinstance(obj.get("body"), dict) else {}
    request_id = "req_" + hashlib.sha1(f"{item.key}:{item.line}".encode()).hexdigest()[:24]
    line_id = "batch_req_" + hashlib.sha1(f"{item.line}:{item.key}".encode()).hexdigest()[:24]
    failure = item.error or next((r.error for r in results if r.error), None)
    if failure:
        error = {"code": "invalid_request", "message": failure}
        return {"id": line_id, "custom_id": item.key,
                "response": {"status_code": 400, "request_id": request_id, "body": {"error": error}}, "error": None}
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    prompt = _prompt(url, body)
    has_mask = "MASK]" in prompt
    choices = []
    for k, r in enumerate(results):
        text, stopped = _cut(_answer(r, has_mask), stop)
        reason = "stop" if stopped or r.finish_reason == "stop" else "length"
        if url == "/v1/chat/completions":
            choices.append({"index": k, "message": {"role": "assistant", "content": text}, "finish_reason": reason})
        else:
            choices.append({"index": k, "text": text, "logprobs": None, "finish_reason": reason, "blanks": r.blanks})
    prompt_tokens = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    response = {"id": request_id, "object": "chat.completion" if url == "/v1/chat/completions" else "text_completion",
                "created": int(time.time()), "model": body.get("model", "glm-tp"), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}
    return {"id": line_id, "custom_id": item.key,
            "response": {"status_code": 200, "request_id": request_id, "body": response}, "error": None}
