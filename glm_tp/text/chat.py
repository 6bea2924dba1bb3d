"""Chat messages to a prompt, in the format the model was trained on (selected by `ModelConfig.chat_template`).

ChatGLM-6B ("chatglm"): a first question is sent as it is; with earlier turns, every turn is written
`[Round i]\\n问：{question}\\n答：{answer}\\n` (i from 0) and the new one ends with `答：`; then [gMASK] and
sop, so the answer is a long blank at the end. ChatGLM-6B has no system role: system messages are put
before the first question.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from glm_tp.config import SpecialTokens
from glm_tp.text.blanks import PromptError
from glm_tp.text.tokenizer import GLMTokenizer

TEMPLATES = ("chatglm",)


def _turns(messages: list[dict]) -> tuple[list[tuple[str, str]], str]:
    """(earlier (question, answer) pairs, the new question) from OpenAI-style messages."""
    system = [str(m.get("content", "")) for m in messages if m.get("role") == "system"]
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not rest or rest[-1].get("role") != "user":
        raise PromptError("chat messages must end with a user message")
    if system:  # no system role in ChatGLM-6B: its text leads the first question
        first = next(m for m in rest if m.get("role") == "user")
        first["content"] = "\n".join(system + [str(first.get("content", ""))])
    history: list[tuple[str, str]] = []
    question: str | None = None
    for m in rest:
        role, content = m.get("role"), str(m.get("content", ""))
        if role == "user":  # two questions in a row make one
            question = content if question is None else question + "\n" + content
        elif role == "assistant":
            if question is None:
                raise PromptError("an assistant message must follow a user message")
            history.append((question, content))
            question = None
        else:
            raise PromptError(f"unknown chat role {role!r}: use system, user or assistant")
    return history, question


def chat_prompt(messages: list[dict], template: str) -> str:
    """The prompt text (without [gMASK] and sop) for `messages` in the model's chat format."""
    if template not in TEMPLATES:
        raise PromptError("this model has no chat format: send a completion prompt instead")
    history, question = _turns(messages)
    if not history:
        return question
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return f"{rounds}[Round {len(history)}]\n问：{question}\n答："


def chat_ids(messages: list[dict], tok: GLMTokenizer, template: str) -> list[int]:
    """Context ids for a chat request: the prompt's text encoded as plain text (a "[MASK]" typed by a user is
    not a blank), then [gMASK]; the engine adds sop."""
    special: SpecialTokens = tok.special
    masks = {special.mask, special.smask, special.gmask}
    return [i for i in tok.encode(chat_prompt(messages, template)) if i not in masks] + [special.gmask]


ChatFormat = Callable[[list[dict]], list[int]]


def chat_format(template: str | None, tok: GLMTokenizer) -> ChatFormat | None:
    """The messages -> context ids function of a model with a chat format (None: the model has none)."""
    return partial(chat_ids, tok=tok, template=template) if template else None
