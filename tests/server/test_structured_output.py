"""response_format through the server and the JSONL lines (frontends/structured.py): the official client gets
JSON under its schema from a random-weight chat model, streamed or not; a GLM blank's answer follows a regex;
bad values are 400s naming response_format; a grammar longer than max_tokens ends with length; the metrics
count the grammar's time."""
from __future__ import annotations

import importlib
import json
import re

import httpx
import pytest

from glm_tp.engine import grammar
from glm_tp.engine.constraints import Regex
from glm_tp.engine.types import GenerationConfig
from glm_tp.frontends.batch import parse_line
from glm_tp.frontends.openai_format import OpenAIError, parse_body
from tests.support.byte_tokenizer import write_byte_tokenizer
from tests.support.engines import engine_for
from tests.support.server import causal_engine, start

pytest.importorskip("llguidance", reason="the grammar extra (llguidance) is not installed")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1,
                                                                              "maximum": 30}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_byte_tokenizer(tmp_path_factory.mktemp("structured-spm"))


@pytest.fixture(scope="module")
def live(tmp_path_factory, tokenizer):
    server = start(causal_engine(tmp_path_factory.mktemp("structured"), tokenizer))
    yield server
    server.close()


def _client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_the_official_client_gets_json_under_its_schema(live, temperature):
    reply = _client(live).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "plan a trip"}], max_tokens=40, seed=4,
        temperature=temperature, response_format=FORMAT)
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_a_streamed_answer_is_json_too(live):
    stream = _client(live).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "plan a trip"}], max_tokens=40, stream=True,
        response_format={"type": "json_object"}, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_a_grammar_longer_than_max_tokens_ends_with_length_and_the_server_goes_on(live):
    body = {"prompt": "one two", "max_tokens": 3, "response_format": {"type": "regex", "regex": "[a-z]{50}"}}
    choice = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "length" and re.fullmatch("[a-z]+", choice["text"]), choice
    assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "one", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("value, says", [
    ("json", "must be an object whose type is one of"),
    ({"type": "xml"}, "must be an object whose type is one of"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": 7, "schema": {}}}, "json_schema.name must be a string"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "json_schema.schema must be a JSON"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "does not compile"),
    ({"type": "regex", "regex": "[0-9"}, "response_format.regex does not compile"),
    ({"type": "regex"}, "response_format.regex must be a pattern"),
])
def test_bad_response_formats_are_400s_naming_the_field(live, value, says):
    for route, body in (("completions", {"prompt": "one"}),
                        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        reply = httpx.post(f"{live.url}/v1/{route}", json={**body, "response_format": value}, timeout=60)
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == "response_format" and says in error["message"], error


def test_a_schema_with_nan_or_an_infinite_number_is_a_400_naming_it(live):
    for number in ("NaN", "-Infinity", "1e999"):  # no JSON numbers, though Python's parser takes them
        body = '{"prompt": "one", "response_format": {"type": "json_schema", "json_schema": {"name": "x", ' \
               '"schema": {"type": "number", "maximum": %s}}}}' % number
        reply = httpx.post(f"{live.url}/v1/completions", content=body, headers={"content-type": "application/json"})
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == "response_format", error
        assert error["message"].startswith("response_format.json_schema.schema holds NaN or an infinite"), error
    assert httpx.post(f"{live.url}/v1/completions", json={"prompt": "one", "max_tokens": 2}).status_code == 200


def test_the_metrics_count_the_grammars_time(live):
    def figure(name: str) -> float:
        text = httpx.get(live.url + "/metrics").text
        return float(re.search(rf"^glm_tp_{name} (\S+)$", text, re.MULTILINE).group(1))

    before = figure("grammar_steps")
    body = {"prompt": "one", "max_tokens": 6, "response_format": {"type": "regex", "regex": "[a-z]{4}"}}
    assert httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).status_code == 200
    assert figure("grammar_steps") >= before + 4 and figure("grammar_seconds") > 0


def test_each_blank_of_a_glm_prompt_follows_the_regex(tiny_checkpoints, tokenizer):
    server = start(engine_for(tiny_checkpoints[1], tokenizer, default=GenerationConfig(max_new_tokens=12)))
    try:
        body = {"prompt": "monday is [MASK] and june is [MASK] of the year", "max_tokens": 12,
                "response_format": {"type": "regex", "regex": "(day|month) [0-9]{1,2}"}}
        text = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        server.close()
    found = re.fullmatch(r"monday is ?(.*) and june is ?(.*) of the year", text)
    assert found and all(re.fullmatch(r"(day|month) [0-9]{1,2}", a) for a in found.groups()), text


def test_jsonl_lines_take_response_format():
    line = parse_line(1, json.dumps({"prompt": "one", "response_format": {"type": "json_object"}}), GenerationConfig())
    assert line.error is None and line.requests[0].grammar is not None
    body = {"prompt": ["a", "b"], "n": 2, "response_format": {"type": "regex", "regex": "[0-9]+"}}
    batch = parse_line(2, json.dumps({"custom_id": "x", "url": "/v1/completions", "body": body}), GenerationConfig())
    assert [r.grammar for r in batch.requests] == [Regex("[0-9]+")] * 4
    bad = parse_line(3, json.dumps({"prompt": "one", "response_format": {"type": "regex", "regex": "("}}),
                     GenerationConfig())
    assert bad.error.startswith("line 3: response_format.regex does not compile"), bad.error


def test_without_the_grammar_library_response_format_is_a_400_that_says_how_to_install_it(monkeypatch):
    real = importlib.import_module

    def without_llguidance(name: str, *args):
        if name == "llguidance":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(grammar.importlib, "import_module", without_llguidance)
    body = {"prompt": "one", "response_format": {"type": "json_object"}}
    with pytest.raises(OpenAIError) as refused:
        parse_body("completion", body, GenerationConfig(), "x")
    assert refused.value.param == "response_format" and "pip install 'glm-tp[grammar]'" in refused.value.message
    assert parse_body("completion", {**body, "response_format": {"type": "text"}}, GenerationConfig(), "x")


def test_the_published_schema_has_response_format(live):
    schema = httpx.get(live.url + "/openapi.json", timeout=60).json()
    for route in ("/v1/completions", "/v1/chat/completions"):
        body = schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        kinds = [f["properties"]["type"] for f in body["properties"]["response_format"]["anyOf"]]
        assert {"const": "regex"} in kinds and {"const": "json_schema"} in kinds
