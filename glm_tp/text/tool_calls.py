"""Tools and tool calls in ChatGLM3's and GLM-4's own formats: the tools in the system message, an earlier call
as the model writes one, and the model's reply read back as content or a call.

ChatGLM3 (its PROMPT.md, build_chat_input): the system message's content (without one, the tools prompt of
THUDM's demos), a newline, then the functions ({name, description, parameters}) as a JSON list indented by 4.
A call is the assistant turn `<|assistant|>NAME` + newline + a Python block "```python\\ntool_call(k=v, ...)\\n```".
THUDM's demos eval() that block; here it is read with `ast`, literal values only, so nothing in it runs.

GLM-4 (glm-4-9b-chat's chat template): a system turn of its own before the messages: the template's preamble,
"# 可用工具", then per function "## NAME", the function as JSON indented by 4, and the line asking for JSON
arguments. A call is `<|assistant|>NAME` + newline + the arguments as JSON.

In both the result comes back as an `<|observation|>` turn, and the model ends a call with <|observation|>
(a stop id). A reply's first line is its metadata: empty for a plain reply, else the name of the function called.
"""
from __future__ import annotations

import ast
import json
import keyword
import math
from dataclasses import dataclass

from glm_tp.text.blanks import PromptError

TOOL_TEMPLATES = ("chatglm3", "glm4")
CHATGLM3_TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                 "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4_TOOLS_HEADING = "\n\n# 可用工具"
GLM4_ARGUMENTS_LINE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
PYTHON_OPEN, PYTHON_CLOSE = "```python\ntool_call(", ")\n```"


def _dumps(value: object, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def with_tools(messages: list[dict], functions: list[dict], template: str) -> list[dict]:
    """The messages with the tools' system text: GLM-4's as a system turn of its own before them, ChatGLM3's
    after the first message's content when that is a system message (else in a system message of its own)."""
    if template == "glm4":
        text = GLM4_PREAMBLE + GLM4_TOOLS_HEADING + "".join(
            f"\n\n## {f['name']}\n\n{_dumps(f, 4)}{GLM4_ARGUMENTS_LINE}" for f in functions)
        return [{"role": "system", "content": text}] + messages
    listed = "\n" + _dumps(functions, 4)
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": str(messages[0].get("content") or "") + listed}] + messages[1:]
    return [{"role": "system", "content": CHATGLM3_TOOLS_PROMPT + listed}] + messages


# -- an earlier call, as the model writes it -------------------------------------------------------
def _python(value: object) -> str:
    """A JSON value as a Python literal (JSON strings are Python string literals)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float, str)):
        return _dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python(v) for v in value) + "]"
    return "{" + ", ".join(f"{_dumps(k)}: {_python(v)}" for k, v in value.items()) + "}"  # type: ignore[union-attr]


def call_message(name: str, arguments: dict, template: str) -> dict:
    """An assistant's call in the model's format: its metadata line (the name) and content."""
    if template == "glm4":
        return {"role": "assistant", "metadata": name, "content": _dumps(arguments)}
    bad = [k for k in arguments if not k.isidentifier() or keyword.iskeyword(k)]
    if bad:
        raise PromptError(f"ChatGLM3 writes a call's arguments as Python keyword arguments, and {bad[0]!r} is "
                          f"not a Python name")
    kwargs = ", ".join(f"{k}={_python(v)}" for k, v in arguments.items())
    return {"role": "assistant", "metadata": name, "content": f"{PYTHON_OPEN}{kwargs}{PYTHON_CLOSE}"}


# -- the model's reply -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """A reply read back: content (a plain reply), or a call (name and arguments as a JSON object's text),
    or why the call could not be read (error; the name as written, if any)."""

    content: str | None = None
    name: str | None = None
    arguments: str | None = None
    error: str | None = None


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _json_arguments(text: str) -> dict:
    value = json.loads(text, parse_constant=_no_constants)  # NaN and Infinity are not JSON
    if not isinstance(value, dict):
        raise ValueError(f"the arguments are a JSON {type(value).__name__}, not an object")
    return value


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    raise ValueError(f"{value!r:.40} has no JSON form")


def _python_arguments(text: str) -> dict:
    """tool_call(k=v, ...) in a Python block: keyword arguments with literal values only, read, never run."""
    lines = text.strip().split("\n")
    if lines and lines[0].startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip() == "```":
        lines = lines[:-1]
    call = ast.parse("\n".join(lines).strip(), mode="eval").body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("the block is not one tool_call(...) expression")
    if call.args or any(k.arg is None for k in call.keywords):
        raise ValueError("tool_call takes keyword arguments only")
    names = [k.arg for k in call.keywords]
    if len(set(names)) != len(names):
        raise ValueError("an argument is given twice")
    return {k.arg: _literal(k.arg, k.value) for k in call.keywords}  # type: ignore[misc]


def _literal(name: str, node: ast.expr) -> object:
    try:
        return _jsonable(ast.literal_eval(node))  # literals only: nothing is called or looked up
    except ValueError as e:
        raise ValueError(f"argument {name} is not a literal value" if "malformed" in str(e) else
                         f"argument {name}: {e}") from None


def read_reply(text: str, template: str, names: tuple[str, ...]) -> Reply:
    """The generated text read as the model's reply: an empty first line (or none at all, as THUDM's servers
    read it) is a plain reply; a first line that names one of `names` is a call whose arguments follow."""
    metadata, newline, rest = text.partition("\n")
    if not newline or not metadata.strip():
        return Reply(content=rest if newline else text)
    name = metadata.strip()
    if name not in names:
        return Reply(name=name, error=f"the model called {name[:64]!r}, which is not one of the tools given "
                                      f"({', '.join(names)})")
    try:
        arguments = _json_arguments(rest.strip()) if template == "glm4" else _python_arguments(rest)
        return Reply(name=name, arguments=json.dumps(arguments, ensure_ascii=False, allow_nan=False))
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as e:
        why = str(e).split("\n")[0][:200] or type(e).__name__
        form = "JSON object" if template == "glm4" else "tool_call(...) of Python literals"
        return Reply(name=name, error=f"the model's arguments for {name} are not a valid {form}: {why}")
