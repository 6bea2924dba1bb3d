"""Chat messages to a prompt, in the format the model was trained on (selected by `ModelConfig.chat_template`).

ChatGLM-6B ("chatglm"): a first question is sent as it is; with earlier turns, every turn is written
`[Round i]\\n问：{question}\\n答：{answer}\\n` (i from 0) and the new one ends with `答：`; then [gMASK] and
sop, so the answer is a long blank at the end. ChatGLM-6B has no system role: system messages are put
before the first question.

ChatGLM2 ("chatglm2"): every turn, the first too, is `[Round i]\\n\\n问：{question}\\n\\n答：{answer}\\n\\n`
(i from 1), the new one ends with `答：`; the context is [gMASK] sop, then that text. No system role either.

ChatGLM3 ("chatglm3") and GLM-4 ("glm4"): [gMASK] sop, then each message as its role token
(<|system|> <|user|> <|assistant|> <|observation|>; a "tool" message is an observation), its metadata (usually
none) and a newline, and its content; the context ends with <|assistant|>. ChatGLM3 encodes the metadata line
and the content apart (its build_chat_input), GLM-4 as one text (its chat template, which skips a message
without content). The contents are plain text: a "<|user|>" typed in one is text, not the role token.
The context ends with <|assistant|> and the newline of a plain reply's empty metadata line: the model's reply
is then its content alone (its own code strips that line from what it generates). With tools (text/tool_calls.py)
the context may end at <|assistant|> (`open_reply`), so the model writes that line itself: empty, or the name
of the function it calls.
"""
from __future__ import annotations

from dataclasses import dataclass

from glm_tp.text.base import BaseTokenizer
from glm_tp.text.blanks import PromptError
from glm_tp.text.tool_calls import TOOL_TEMPLATES, with_tools

TEXT_TEMPLATES = ("chatglm", "chatglm2")
ROLE_TEMPLATES = ("chatglm3", "glm4")
TEMPLATES = TEXT_TEMPLATES + ROLE_TEMPLATES
ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation"}  # OpenAI's name for a tool's result
SOP_NAMES = {"chatglm2": "sop", "chatglm3": "sop", "glm4": "<sop>"}  # how each model's prefix is written

Part = str | tuple[str]  # text, or (special token name,)


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


def _rounds_text(messages: list[dict], template: str) -> str:
    history, question = _turns(messages)
    if template == "chatglm2":
        rounds = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, 1))
        return f"{rounds}[Round {len(history) + 1}]\n\n问：{question}\n\n答："
    if not history:
        return question
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return f"{rounds}[Round {len(history)}]\n问：{question}\n答："


def _role_parts(messages: list[dict], template: str, open_reply: bool = False) -> list[Part]:
    """ChatGLM3's and GLM-4's context: the prefix, each message's role token and text, <|assistant|> and the
    newline that opens a plain reply (open_reply: <|assistant|> alone, the model writes its metadata line)."""
    parts: list[Part] = [("[gMASK]",), (SOP_NAMES[template],)]
    last = ""
    for i, m in enumerate(messages):
        role = ROLE_ALIASES.get(str(m.get("role")), str(m.get("role")))
        if role not in ROLES:
            raise PromptError(f"unknown chat role {m.get('role')!r} in message {i}: use system, user, assistant "
                              f"or observation (tool)")
        content, metadata = str(m.get("content") or ""), str(m.get("metadata") or "")
        last = role
        if template == "glm4":
            if content:  # GLM-4's template leaves a message without content out
                parts += [(f"<|{role}|>",), f"{metadata}\n{content}"]
        else:
            parts += [(f"<|{role}|>",), f"{metadata}\n", content]
    if last not in ("user", "observation"):
        raise PromptError("chat messages must end with a user message (or a tool's observation)")
    return parts + ([("<|assistant|>",)] if open_reply else [("<|assistant|>",), "\n"])  # "\n": a plain reply


def _parts(messages: list[dict], template: str, tools: list[dict] | None = None,
           open_reply: bool = False) -> list[Part]:
    """tools: function definitions {name, description, parameters} (ChatGLM3 and GLM-4 only)."""
    if template not in TEMPLATES:
        raise PromptError("this model has no chat format: send a completion prompt instead")
    if messages and not str(messages[-1].get("content") or "").strip():  # the model would answer nothing
        raise PromptError(f"the last message (messages[{len(messages) - 1}]) is empty: give it some text")
    if (tools or open_reply) and template not in TOOL_TEMPLATES:
        raise PromptError(f"this model's chat format ({template}) has no tool calls")
    if template in ROLE_TEMPLATES:
        return _role_parts(with_tools(messages, tools, template) if tools else messages, template, open_reply)
    text = _rounds_text(messages, template)
    return [("[gMASK]",), ("sop",), text] if template == "chatglm2" else [text]


def chat_prompt(messages: list[dict], template: str, tools: list[dict] | None = None, open_reply: bool = False) -> str:
    """The prompt as text, special tokens by name ("chatglm": without [gMASK] and sop, which the engine adds)."""
    return "".join(p[0] if isinstance(p, tuple) else p for p in _parts(messages, template, tools, open_reply))


def _special_id(tok: BaseTokenizer, name: str) -> int:
    if name in ("[gMASK]", "sop", "<sop>"):  # the model's own ids, as the engine uses them
        return tok.special.gmask if name == "[gMASK]" else tok.special.sop
    i = tok.token_id(name)
    if i is None:
        raise PromptError(f"this model's tokenizer has no {name} token, which its chat format needs: its "
                          f"checkpoint metadata's tokenizer_specials should name it")
    return i


def chat_ids(messages: list[dict], tok: BaseTokenizer, template: str, tools: list[dict] | None = None,
             open_reply: bool = False) -> list[int]:
    """Context ids for a chat request. ChatGLM2/3, GLM-4: the whole context, [gMASK] sop first, used as it is.
    ChatGLM-6B: the prompt's text encoded as plain text (a "[MASK]" typed by a user is not a blank), then
    [gMASK]; the engine adds sop."""
    parts = _parts(messages, template, tools, open_reply)
    if template == "chatglm":
        special = tok.special
        masks = {special.mask, special.smask, special.gmask}
        return [i for i in tok.encode(parts[0]) if i not in masks] + [special.gmask]
    ids: list[int] = []
    for p in parts:
        ids += [_special_id(tok, p[0])] if isinstance(p, tuple) else tok.encode(p)
    return ids


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat format: messages (and tools) -> context ids."""

    template: str
    tok: BaseTokenizer

    def __call__(self, messages: list[dict], tools: list[dict] | None = None, open_reply: bool = False) -> list[int]:
        return chat_ids(messages, self.tok, self.template, tools, open_reply)


def chat_format(template: str | None, tok: BaseTokenizer) -> ChatFormat | None:
    """The messages -> context ids function of a model with a chat format (None: the model has none)."""
    return ChatFormat(template, tok) if template else None
