"""Tool calls through the official `openai` client on random tiny ChatGLM3/GLM-4 models. The grammar library is
replaced by a scripted constraint (Engine.grammars patched) that writes a fixed call for the grammar it is
given, so a forced call is deterministic; an auto reply is scripted the same way (Request.constraint). Whole and
streamed calls, an invalid call, the history in the model's format, a batch line and the 400s at the edge."""
from __future__ import annotations

import json
import re

import httpx
import pytest
from openai import OpenAI

from glm_tp import load_model
from glm_tp.config import CHATGLM2_SPECIALS, CHATGLM3_ROLES, PRESETS
from glm_tp.engine.constraints import JsonValue, Literal, OneOf, Regex, Sequence
from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.core import Engine
from glm_tp.engine.types import GenerationConfig
from glm_tp.frontends.batch import run_batch
from glm_tp.frontends.openai_format import OpenAIError, parse_body
from glm_tp.text.chat import ChatFormat
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from glm_tp.text.tool_calls import call_message
from tests.support.engines import causal_checkpoint
from tests.support.scripted import Scripted
from tests.support.server import start, watch_handles
from tests.text.conftest import glm2_tokenizer_file  # noqa: F401  (a fixture: a byte-fallback ChatGLM2-style model)

CFG = PRESETS["tiny-chatglm2"]
# the tiny preset's specials, then ChatGLM3's and GLM-4's role tokens after them
SPECIALS = dict(zip(CHATGLM2_SPECIALS + CHATGLM3_ROLES, (1000, 1001, 1002, 1004, 1005, 1006, 1007, 1008, 1009)))
ASSISTANT = SPECIALS["<|assistant|>"]
WEATHER = {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "The time in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
ASK = [{"role": "user", "content": "weather in Beijing?"}]
CALLS = {"glm4": 'get_weather\n{"city": "Beijing", "days": 2}',
         "chatglm3": 'get_weather\n```python\ntool_call(city="Beijing", days=2)\n```'}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Script:
    """Engine.grammars replaced: each grammar it is given is kept, and its constraint writes `text`."""

    def __init__(self, engine: Engine, text: str):
        self.engine, self.text, self.grammars = engine, text, []
        engine.grammars = self.compile

    def compile(self, grammar):
        self.grammars.append(grammar)
        ids = self.engine.tok.encode(self.text)
        return lambda: Scripted(ids, CFG.vocab_size)


def tool_engine(root, tokenizer_file, template: str) -> Engine:
    ckpt = causal_checkpoint(root, chat_template=template, stop_ids=(SPECIALS["<|user|>"], SPECIALS["<|observation|>"]),
                             max_seq_len=1024)
    tok = ChatGLM2Tokenizer(tokenizer_file, CFG.special, SPECIALS)
    return Engine(load_model(ckpt, progress=False), tok, default=GenerationConfig(max_new_tokens=64), max_batch=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="module")
def glm4(root, glm2_tokenizer_file):  # noqa: F811
    engine = tool_engine(root, glm2_tokenizer_file, "glm4")
    script = Script(engine, CALLS["glm4"])
    server = start(engine)
    yield server, script
    server.close()


def _client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _streamed_calls(stream) -> tuple[dict, str | None, list]:
    """The calls of a stream assembled as OpenAI's documentation assembles them (by index), its finish reason
    and the tool-call deltas."""
    calls: dict[int, dict] = {}
    finish, deltas = None, []
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                deltas.append(tc)
                call = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
    return calls, finish, deltas


def test_a_named_call_is_forced_and_comes_back_whole_and_streamed(glm4):
    server, script = glm4
    client = _client(server)
    script.grammars.clear()
    response = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice=NAMED)
    choice = response.choices[0]
    call = choice.message.tool_calls[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Beijing", "days": 2}
    assert script.grammars == [Sequence((Literal("get_weather\n"), JsonValue(WEATHER["parameters"])))]
    stream = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice=NAMED, stream=True)
    calls, finish, deltas = _streamed_calls(stream)
    assert finish == "tool_calls" and len(deltas) >= 2
    first = deltas[0]  # as OpenAI streams a call: index, id, type and name first, the arguments after
    assert first.id.startswith("call_") and first.id != call.id and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]
    with client.chat.completions.stream(model="demo", messages=ASK, tools=TOOLS, tool_choice=NAMED) as helper:
        final = helper.get_final_completion().choices[0].message  # the client's own assembly
    assert final.tool_calls[0].function.arguments == call.function.arguments and not final.content


def test_required_chooses_among_every_tool(glm4):
    server, script = glm4
    script.grammars.clear()
    body = _client(server).chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice="required")
    assert body.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert script.grammars == [OneOf((Sequence((Literal("get_weather\n"), JsonValue(WEATHER["parameters"]))),
                                      Sequence((Literal("get_time\n"), JsonValue(TIME["parameters"])))))]


def _counted(server, outcome: str) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    found = re.search(rf'glm_tp_tool_calls_total\{{outcome="{outcome}"\}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def test_an_invalid_call_ends_its_choice_with_a_reason_and_the_server_stays_up(glm4):
    server, script = glm4
    invalid, valid = _counted(server, "invalid"), _counted(server, "valid")
    script.text = 'get_weather\n{"city": Beijing}'
    try:
        body = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "n": 2}).json()
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    finally:
        script.text = CALLS["glm4"]
    for choice in body["choices"]:
        assert choice["finish_reason"] == "invalid_tool_call" and "tool_calls" not in choice["message"]
        error = choice["error"]
        assert error["code"] == "invalid_tool_call" and "not a valid JSON object" in error["message"]
        assert choice["message"]["content"] == 'get_weather\n{"city": Beijing}'  # what the model wrote
    end = events[-1]["choices"][0]
    assert end["finish_reason"] == "invalid_tool_call" and end["error"]["code"] == "invalid_tool_call"
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == \
        'get_weather\n{"city": Beijing}'
    again = _client(server).chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice=NAMED)
    assert again.choices[0].finish_reason == "tool_calls"
    assert _counted(server, "invalid") == invalid + 3 and _counted(server, "valid") == valid + 1


def _scripted_replies(coordinator: Coordinator, text: str) -> list:
    """Every request submitted from now on writes `text` (a scripted logits processor): its handles."""
    handles, submit = [], coordinator.submit

    def scripted(request, *args, **kwargs):
        ids = coordinator.engine.tok.encode(text)
        request.constraint = lambda: Scripted(ids, CFG.vocab_size)
        handles.append(submit(request, *args, **kwargs))
        return handles[-1]
    coordinator.submit = scripted
    return handles


@pytest.mark.parametrize("reply,content,calls", [("\nIt is sunny.", "It is sunny.", False),
                                                 (CALLS["glm4"], None, True)])
def test_auto_leaves_the_metadata_line_to_the_model(glm4, reply, content, calls):
    server, script = glm4
    handles = _scripted_replies(server.coordinator, reply)
    try:
        client = _client(server)
        whole = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, logprobs=True)
        streamed = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, stream=True, logprobs=True)
        chunks = list(streamed)
    finally:
        del server.coordinator.submit  # the instance attribute goes; the class's submit is back
    assert handles[0].request.grammar is None and handles[0].request.token_ids[-1] == ASSISTANT
    message = whole.choices[0].message
    assert message.content == content and bool(message.tool_calls) == calls
    assert whole.choices[0].finish_reason == ("tool_calls" if calls else "stop")
    text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert text == (content or "")
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    streamed_logprobs = [lp for chunk in chunks for c in chunk.choices if c.logprobs for lp in c.logprobs.content]
    assert len(streamed_logprobs) == len(whole.choices[0].logprobs.content) > 0  # held ones are sent, not lost


def test_none_shows_the_tools_and_opens_a_plain_reply(glm4):
    server, _ = glm4
    handles = watch_handles(server.coordinator)
    try:
        body = _client(server).chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice="none",
                                                       max_tokens=4)
    finally:
        del server.coordinator.submit
    ids, chat = handles[0].request.token_ids, server.coordinator.chat_format
    assert ids == chat(ASK, tools=[WEATHER, TIME]) and ids[-1] != ASSISTANT and handles[0].request.grammar is None
    assert body.choices[0].message.tool_calls is None and body.choices[0].finish_reason in ("stop", "length")


def test_earlier_calls_and_tool_results_go_back_in_the_models_format(glm4):
    server, _ = glm4
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    handles = watch_handles(server.coordinator)
    try:
        _client(server).chat.completions.create(model="demo", messages=history, tools=TOOLS, max_tokens=2)
    finally:
        del server.coordinator.submit
    expected = ASK + [call_message("get_weather", {"city": "Beijing"}, "glm4"),
                      {"role": "observation", "content": '{"sky": "sunny"}'}]
    chat = server.coordinator.chat_format
    assert handles[0].request.token_ids == chat(expected, tools=[WEATHER, TIME], open_reply=True)


def test_chatglm3_reads_its_python_call_into_json(root, glm2_tokenizer_file):  # noqa: F811
    engine = tool_engine(root, glm2_tokenizer_file, "chatglm3")
    script = Script(engine, CALLS["chatglm3"])
    server = start(engine)
    try:
        client = _client(server)
        call = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice=NAMED) \
            .choices[0].message.tool_calls[0]
        calls, finish, _ = _streamed_calls(client.chat.completions.create(
            model="demo", messages=ASK, tools=TOOLS, tool_choice=NAMED, stream=True))
    finally:
        server.close()
    assert json.loads(call.function.arguments) == {"city": "Beijing", "days": 2}
    assert finish == "tool_calls" and calls[0]["arguments"] == call.function.arguments
    forced = script.grammars[0]  # the call's frame as literals, its keyword arguments as a regex
    assert forced.parts[0] == Literal("get_weather\n```python\ntool_call(") and forced.parts[2] == Literal(")\n```")
    assert isinstance(forced.parts[1], Regex)
    assert re.fullmatch(forced.parts[1].pattern, 'city="Beijing", days=2')
    assert not re.fullmatch(forced.parts[1].pattern, 'town="Beijing"')  # only the function's parameters


def test_a_batch_line_gets_its_tool_call(root, glm2_tokenizer_file, tmp_path):  # noqa: F811
    engine = tool_engine(root, glm2_tokenizer_file, "glm4")
    Script(engine, CALLS["glm4"])
    line = {"custom_id": "t1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": ASK, "tools": TOOLS, "tool_choice": NAMED}}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(line) + "\n")
    run_batch(Coordinator(engine.tp, engine), src, out)
    choice = json.loads(out.read_text())["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Beijing", "days": 2}


@pytest.mark.parametrize("change,param,words", [
    ({"tools": {"type": "function"}}, "tools", "list of 1 to 128"),
    ({"tools": []}, "tools", "list of 1 to 128"),
    ({"tools": [{"type": "function", "function": {**WEATHER}}] * 2}, "tools[1].function.name", "given twice"),
    ({"tools": [{"type": "function", "function": {**WEATHER, "name": "get weather"}}]}, "tools[0].function.name",
     "1 to 64 letters"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]", "must be {\"type\": \"function\""),
    ({"tools": [{"type": "function", "function": {**WEATHER, "parameters": "x"}}]}, "tools[0].function.parameters",
     "JSON Schema object"),
    ({"tools": [{"type": "function", "function": {**WEATHER, "extra": 1}}]}, "tools[0].function", "unknown field"),
    ({"tools": [{"type": "function", "function": {**WEATHER, "description": "x" * 40000}}]}, "tools[0].function",
     "longer than"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "naming one of the tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "naming one of the tools"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice", "only allowed when tools are given"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": "{nope"}}]}, {"role": "tool", "content": "x"}]},
     "messages[1].tool_calls[0].function.arguments", "not JSON"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
                         {"role": "tool", "content": "x"}]}, "messages[1].tool_calls[0]", "\"arguments\""),
])
def test_tools_fields_are_checked_at_the_edge(change, param, words, glm2_tokenizer_file):  # noqa: F811
    chat = ChatFormat("glm4", ChatGLM2Tokenizer(glm2_tokenizer_file, CFG.special, SPECIALS))
    body = {"messages": ASK, "tools": TOOLS, **change}
    with pytest.raises(OpenAIError) as e:
        parse_body("chat", {k: v for k, v in body.items() if v is not None}, GenerationConfig(), "c", chat)
    assert e.value.param == param and e.value.status == 400 and words in e.value.message


@pytest.mark.parametrize("template", ["chatglm", "chatglm2", None])
def test_a_model_without_a_tool_call_format_refuses_tools(template, glm2_tokenizer_file):  # noqa: F811
    chat = ChatFormat(template, ChatGLM2Tokenizer(glm2_tokenizer_file)) if template else None
    with pytest.raises(OpenAIError, match="has no tool-call format") as e:
        parse_body("chat", {"messages": ASK, "tools": TOOLS}, GenerationConfig(), "c", chat)
    assert e.value.param == "tools"
