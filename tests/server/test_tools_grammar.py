"""Forced tool calls with the real grammar library (no script): on random-weight ChatGLM3 and GLM-4 models the
grammar alone makes the model call the named function with arguments that follow its parameters schema, and
the reply comes back as OpenAI's tool_calls. response_format with callable tools is refused at the edge."""
from __future__ import annotations

import json

import httpx
import pytest

from glm_tp import load_model
from glm_tp.engine.core import Engine
from glm_tp.engine.types import GenerationConfig
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from tests.server.test_tools import ASK, CFG, SPECIALS
from tests.support.engines import causal_checkpoint
from tests.support.server import start
from tests.text.conftest import glm2_tokenizer_file  # noqa: F401  (a fixture: a byte-fallback ChatGLM2-style model)

pytest.importorskip("llguidance", reason="the grammar extra (pip install 'glm-tp[grammar]') is not installed")

UNIT = {"name": "set_unit", "description": "Choose the temperature unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"enum": [1, 2, 3]}},
    "required": ["unit", "days"], "additionalProperties": False}}
OTHER = {"name": "get_time", "description": "The time",
         "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
TOOLS = [{"type": "function", "function": OTHER}, {"type": "function", "function": UNIT}]


@pytest.fixture(scope="module", params=["glm4", "chatglm3"])
def server(request, tmp_path_factory, glm2_tokenizer_file):  # noqa: F811
    ckpt = causal_checkpoint(tmp_path_factory.mktemp(request.param), chat_template=request.param, max_seq_len=2048,
                             stop_ids=(SPECIALS["<|user|>"], SPECIALS["<|observation|>"]))
    tok = ChatGLM2Tokenizer(glm2_tokenizer_file, CFG.special, SPECIALS)  # byte fallback: it spells any text
    engine = Engine(load_model(ckpt, progress=False), tok, default=GenerationConfig(max_new_tokens=64), max_batch=4)
    running = start(engine)
    yield running
    running.close()


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, **body},
                      timeout=120)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_grammar_alone_forces_a_call_whose_arguments_follow_the_schema(server, seed):
    body = _post(server, {"tool_choice": {"type": "function", "function": {"name": "set_unit"}},
                          "temperature": 1.0, "seed": seed, "max_tokens": 100}).json()
    assert "choices" in body, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    call = choice["message"]["tool_calls"][0]["function"]
    arguments = json.loads(call["arguments"])
    assert call["name"] == "set_unit" and arguments["unit"] in ("celsius", "fahrenheit")
    assert set(arguments) == {"unit", "days"} and arguments["days"] in (1, 2, 3)


def test_models_say_the_model_calls_tools(server):
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["glm"]["tool_calls"] is True


def test_required_calls_one_of_the_tools(server):
    choice = _post(server, {"tool_choice": "required", "max_tokens": 100}).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"][0]["function"]["name"] in ("get_time", "set_unit")


def test_response_format_with_callable_tools_is_a_400_naming_it(server):
    response = _post(server, {"response_format": {"type": "json_object"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    plain = _post(server, {"response_format": {"type": "json_object"}, "tool_choice": "none", "max_tokens": 120})
    assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] in ("stop", "length")
