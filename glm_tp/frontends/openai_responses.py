"""glm-tp results to OpenAI responses: the whole response, a stream's chunks, logprobs and usage, for the bodies
openai_format.py parsed (the HTTP server and JSONL batch jobs answer alike)."""
from __future__ import annotations

from glm_tp.engine.types import Result, TokenLogprob
from glm_tp.frontends import tools as tool_calls
from glm_tp.frontends.openai_format import OpenAIError, Parsed
from glm_tp.text.blanks import INVALID_PROMPT, join_answer

FINISH = {"stop": "stop", "length": "length", "interrupted": "length", "cancelled": "cancelled"}


def answer_text(parsed: Parsed, choice: int, result: Result) -> str:
    """An infilling prompt answers with the filled text, a continuation with what was generated
    (after the prompt when echo is on)."""
    p = parsed.prompt_of(choice)
    if parsed.infill[p]:
        return result.text
    answer, lead = "".join(result.blanks), result.leads[0] if result.leads else ""
    if not parsed.echo:
        return answer
    return join_answer(parsed.prompts[p], lead + answer) if lead else parsed.prompts[p] + answer


def unsent_text(parsed: Parsed, choice: int, result: Result, sent: str) -> str:
    """What a stream still owes a continuation at its end (beam search streams nothing before), so the
    streamed text adds up to the whole response's; infilling streams only the blanks' tokens."""
    if parsed.infill[parsed.prompt_of(choice)]:
        return ""
    answer = "".join(result.blanks)
    return answer[len(sent):] if answer.startswith(sent) else ""


def completion_logprobs(logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t: v for _, t, v in lp.top} for lp in logprobs], "text_offset": offsets}


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]}
                        for lp in logprobs], "refusal": None}


def logprobs_body(parsed: Parsed, logprobs: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    if parsed.logprobs is None or logprobs is None:
        return None
    return completion_logprobs(logprobs, offset) if parsed.kind == "completion" else chat_logprobs(logprobs)


def refusal(result: Result, kind: str) -> OpenAIError:
    """A request that ended in an error before generating anything (refused: it can never run), as an
    OpenAI error with the code the engine gave it."""
    return OpenAIError(result.error or "the request failed", "prompt" if kind == "completion" else "messages",
                       code=result.error_code or INVALID_PROMPT)


def result_error(parsed: Parsed, result: Result) -> OpenAIError | None:
    """A request that ended in an error before generating anything, as an OpenAI error."""
    if result.finish_reason != "error":
        return None
    return refusal(result, parsed.kind)


def _choice(parsed: Parsed, choice: int, result: Result) -> dict:
    text = answer_text(parsed, choice, result)
    p = parsed.prompt_of(choice)
    offset = len(text) - len("".join(result.blanks)) if parsed.echo and not parsed.infill[p] else 0
    out: dict = {"index": choice, "logprobs": logprobs_body(parsed, result.logprobs, offset),
                 "finish_reason": FINISH.get(result.finish_reason, result.finish_reason), "blanks": result.blanks,
                 "pieces": [list(piece) for piece in result.pieces]}
    if parsed.kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
        if parsed.tools is not None and parsed.tools.calls:  # the reply may be a call
            out.update(tool_calls.reply_fields(parsed.tools, text, out["finish_reason"]))
    else:
        out["text"] = text
    return out


def usage(parsed: Parsed, results: list[Result]) -> dict:
    prompt = sum(results[i].prompt_tokens for i in range(0, len(results), parsed.n))
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(parsed: Parsed, results: list[Result], response_id: str, created: int, model: str) -> dict:
    """The whole (non-streaming) response; raises OpenAIError when the engine refused a request."""
    failed = next((e for e in (result_error(parsed, r) for r in results) if e is not None), None)
    if failed is not None:
        raise failed
    return {"id": response_id, "object": "chat.completion" if parsed.kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [_choice(parsed, i, r) for i, r in enumerate(results)],
            "usage": usage(parsed, results)}


def chunk(parsed: Parsed, response_id: str, created: int, model: str, choices: list[dict],
          usage_body: dict | None = None) -> dict:
    """One stream event's JSON; `choices` from `chunk_choice`."""
    body = {"id": response_id, "object": "chat.completion.chunk" if parsed.kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": choices}
    if parsed.include_usage:
        body["usage"] = usage_body
    return body


def chunk_choice(parsed: Parsed, choice: int, text: str, logprobs: list[TokenLogprob] | None = None,
                 result: Result | None = None, blank: int | None = None, first: bool = False) -> dict:
    """A choice's part of a stream event: new text of blank `blank`, or (with `result`) its end."""
    out: dict = {"index": choice, "logprobs": logprobs_body(parsed, logprobs),
                 "finish_reason": FINISH.get(result.finish_reason, result.finish_reason) if result else None}
    if parsed.kind == "chat":
        out["delta"] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    else:
        out["text"] = text
    if blank is not None:
        out["blank"] = blank
    if result is not None:  # the end: the filled blanks, and the whole text in pieces for highlighting
        out.update(blanks=result.blanks, pieces=[list(piece) for piece in result.pieces])
    return out
