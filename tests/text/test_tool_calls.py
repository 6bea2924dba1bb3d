"""Tools and calls in ChatGLM3's and GLM-4's own formats, on their published examples (ChatGLM3's PROMPT.md tool
call, glm-4-9b-chat's chat template with tools), and the model's reply read back without running anything."""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from glm_tp.config import CHATGLM2_SPECIALS, CHATGLM3_ROLES
from glm_tp.text.blanks import PromptError
from glm_tp.text.chat import chat_ids, chat_prompt
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from glm_tp.text.tool_calls import call_message, read_reply

# ChatGLM3's PROMPT.md tool-call example
WEATHER = {"name": "get_current_weather", "description": "Get the current weather in a given location",
           "parameters": {"type": "object", "properties": {
               "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
               "unit": {"type": "string"}}, "required": ["location"]}}
WEATHER_JSON = """{
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {
                "type": "string",
                "description": "The city and state, e.g. San Francisco, CA"
            },
            "unit": {
                "type": "string"
            }
        },
        "required": [
            "location"
        ]
    }
}"""
QUESTION = {"role": "user", "content": "What's the weather in Beijing today?"}
RESULT = {"role": "tool", "content": '{"temperature": 22}'}
CALL = {"location": "beijing", "unit": "celsius"}
# the system turn as ChatGLM3's build_chat_input writes it (content, newline, the tools as JSON), its call as the
# example writes it
CHATGLM3_RENDERED = ("[gMASK]sop<|system|>\nAnswer the following questions as best as you can. You have access to the "
                     "following tools:\n[\n" + "\n".join("    " + line for line in WEATHER_JSON.split("\n")) + "\n]"
                     "<|user|>\nWhat's the weather in Beijing today?<|assistant|>get_current_weather\n```python\n"
                     "tool_call(location=\"beijing\", unit=\"celsius\")\n```<|observation|>\n{\"temperature\": 22}"
                     "<|assistant|>")
# glm-4-9b-chat's template with tools=[WEATHER] (the system message that carries them, content empty)
GLM4_RENDERED = ("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                 "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_current_weather\n\n"
                 + WEATHER_JSON + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nWhat's the weather in Beijing "
                 "today?<|assistant|>get_current_weather\n{\"location\": \"beijing\", \"unit\": \"celsius\"}"
                 "<|observation|>\n{\"temperature\": 22}<|assistant|>")


@pytest.mark.parametrize("template,rendered", [("chatglm3", CHATGLM3_RENDERED), ("glm4", GLM4_RENDERED)])
def test_the_published_tool_call_examples(template, rendered):
    messages = [QUESTION, call_message("get_current_weather", CALL, template), RESULT]
    assert chat_prompt(messages, template, [WEATHER], open_reply=True) == rendered
    closed = chat_prompt(messages, template, [WEATHER])  # tool_choice none: tools shown, a plain reply opened
    assert closed == rendered + "\n"
    assert chat_prompt([QUESTION], template, open_reply=True).endswith("today?<|assistant|>")


def test_chatglm3_puts_the_tools_after_a_given_system_message():
    messages = [{"role": "system", "content": "Be brief."}, QUESTION]
    prompt = chat_prompt(messages, "chatglm3", [WEATHER], open_reply=True)
    assert prompt.startswith("[gMASK]sop<|system|>\nBe brief.\n[\n    {\n        \"name\": \"get_current_weather\"")
    assert prompt.count("<|system|>") == 1
    glm4 = chat_prompt(messages, "glm4", [WEATHER], open_reply=True)  # GLM-4: its tools turn, then the system's
    assert glm4.count("<|system|>") == 2 and "<|system|>\nBe brief.<|user|>" in glm4


def test_chatglm3_ids_encode_each_turns_metadata_line_and_content_apart(glm2_tokenizer_file):
    pieces = spm.SentencePieceProcessor(model_file=str(glm2_tokenizer_file)).get_piece_size()
    tok = ChatGLM2Tokenizer(glm2_tokenizer_file, specials={n: pieces + k for k, n in
                                                           enumerate(CHATGLM2_SPECIALS + CHATGLM3_ROLES)})
    call = call_message("get_current_weather", CALL, "chatglm3")
    ids = chat_ids([QUESTION, call, RESULT], tok, "chatglm3", [WEATHER], open_reply=True)
    role = tok.token_id
    tail = [role("<|assistant|>")] + tok.sp.encode("get_current_weather\n") + tok.sp.encode(call["content"]) + \
        [role("<|observation|>")] + tok.sp.encode("\n") + tok.sp.encode(RESULT["content"]) + [role("<|assistant|>")]
    assert ids[-len(tail):] == tail


def test_tools_on_a_format_without_calls_are_refused():
    with pytest.raises(PromptError, match="chatglm2.*has no tool calls"):
        chat_prompt([QUESTION], "chatglm2", [WEATHER])


@pytest.mark.parametrize("template,text", [
    ("chatglm3", 'get_current_weather\n```python\ntool_call(location="beijing", unit="celsius")\n```'),
    ("chatglm3", "get_current_weather\n ```python\ntool_call(location='beijing', unit=\"celsius\")\n```\n"),
    ("glm4", 'get_current_weather\n{"location": "beijing", "unit": "celsius"}'),
    ("glm4", 'get_current_weather\n  {"location":"beijing","unit":"celsius"}\n')])
def test_a_call_reads_back_as_json_arguments(template, text):
    reply = read_reply(text, template, ("other", "get_current_weather"))
    assert reply.error is None and reply.name == "get_current_weather" and json.loads(reply.arguments) == CALL


def test_python_values_become_json():
    text = 'f\n```python\ntool_call(a=[1, 2.5, (3, None)], b={"k": True}, c=-4)\n```'
    assert json.loads(read_reply(text, "chatglm3", ("f",)).arguments) == {"a": [1, 2.5, [3, None]], "b": {"k": True},
                                                                          "c": -4}


def test_a_plain_reply_is_content():
    assert read_reply("\nHello there\nand more", "glm4", ("f",)).content == "Hello there\nand more"
    assert read_reply("no newline at all", "chatglm3", ("f",)).content == "no newline at all"  # as THUDM's servers
    assert read_reply("", "glm4", ("f",)).content == ""


@pytest.mark.parametrize("text,why", [
    ('f\n```python\ntool_call(x=__import__("os").system("touch {marker}"))\n```', "not a literal"),
    ('f\n```python\nopen("{marker}", "w")\n```', "not one tool_call"),
    ("f\n```python\ntool_call(**{{'x': 1}})\n```", "keyword arguments only"),
    ("f\n```python\ntool_call(1)\n```", "keyword arguments only"),
    ("f\n```python\ntool_call(a=1, a=2)\n```", "given twice"),
    ("f\n```python\ntool_call(a={{1, 2}})\n```", "no JSON form"),
    ("f\n```python\ntool_call(a=1e999)\n```", "no JSON form"),
    ("f\n```python\ntool_call(a=" + "[" * 2000 + ")\n```", "not a valid"),
    ("f\n```python\ntool_call(a=\n```", "not a valid"),
])
def test_chatglm3_calls_are_read_never_run(text, why, tmp_path):
    marker = tmp_path / "ran"
    reply = read_reply(text.format(marker=marker), "chatglm3", ("f",))
    assert reply.name == "f" and reply.arguments is None and why in reply.error
    assert not marker.exists()


@pytest.mark.parametrize("text,why", [
    ('f\n{"a": NaN}', "NaN is not a JSON value"), ("f\n[1, 2]", "a JSON list, not an object"),
    ('f\n{"a": 1', "not a valid JSON object"), ("f\n" + "[" * 100000, "not a valid JSON object"),
    ('g\n{"a": 1}', "'g', which is not one of the tools given (f)")])
def test_glm4_calls_that_cannot_be_read_say_why(text, why):
    reply = read_reply(text, "glm4", ("f",))
    assert reply.arguments is None and why in reply.error


def test_an_earlier_call_with_a_key_python_cannot_name_is_refused_for_chatglm3():
    with pytest.raises(PromptError, match="'not-a-name' is not a Python name"):
        call_message("f", {"not-a-name": 1}, "chatglm3")
    assert call_message("f", {"not-a-name": 1}, "glm4")["content"] == '{"not-a-name": 1}'
    assert call_message("f", {"s": "引号\"\n", "n": None, "b": False, "l": [1.5]}, "chatglm3")["content"] == \
        '```python\ntool_call(s="引号\\"\\n", n=None, b=False, l=[1.5])\n```'
