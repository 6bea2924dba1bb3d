"""The OpenAI body -> requests translation and the JSONL parse path: every bad field gets its own error
naming the field; the job goes on."""
from __future__ import annotations

import json

import pytest

from glm_tp.engine.types import GenerationConfig, Result, TokenLogprob
from glm_tp.frontends import openai_format as oa
from glm_tp.frontends import openai_responses as responses
from glm_tp.frontends.batch import openai_record, parse_line, read_items
from glm_tp.text.blanks import CONTEXT_LENGTH

DEFAULT = GenerationConfig(max_new_tokens=8)


def _parse(body: object, kind: str = "completion") -> oa.Parsed:
    return oa.parse_body(kind, body, DEFAULT, "r")


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "a", "stop": 5}, "stop", "stop must be"),
    ({"prompt": "a", "glm": "beam"}, "glm", "glm must be an object"),
    ({"prompt": "a", "n": "two"}, "n", "n must be an integer between 1 and 16"),
    ({"prompt": "a", "n": 17}, "n", "between 1 and 16"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer between 1 and"),
    ({"prompt": "a", "max_tokens": "8"}, "max_tokens", "max_tokens must be an integer"),
    ({"prompt": "a", "temperature": 3}, "temperature", "temperature must be a number in [0.0, 2.0]"),
    ({"prompt": "a", "top_p": 0}, "top_p", "top_p must be a number in (0.0, 1.0]"),
    ({"prompt": "a", "seed": 1.5}, "seed", "seed must be an integer"),
    ({"prompt": "a", "logprobs": 21}, "logprobs", "between 0 and 20"),
    ({"prompt": "a", "logprobs": True}, "logprobs", "logprobs must be an integer"),
    ({"prompt": "a", "echo": "yes"}, "echo", "echo must be true or false"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"prompt": 5}, "prompt", "prompt must be a string, a non-empty list of strings"),
    ({"prompt": []}, "prompt", "prompt must be"),
    ({"prompt": "a", "glm": {"strategy": "beam", "num_beams": "four"}}, "glm", "num_beams"),
    ({"prompt": "a", "glm": {"colour": 1}}, "glm", "unknown generation setting 'colour'"),
    ({"prompt": ["a"] * 8, "n": 9}, "n", "more than 64 choices"),
])
def test_a_bad_field_is_named(body, param, words):
    with pytest.raises(oa.OpenAIError) as e:
        _parse(body)
    assert e.value.param == param and words in e.value.message and e.value.status == 400
    err = e.value.body()["error"]
    assert err["type"] and err["code"] and err["message"]


@pytest.mark.parametrize("messages, param", [
    ("hi", "messages"), ([], "messages"), ([{"content": "x"}], "messages[0]"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
])
def test_bad_messages_are_named(messages, param):
    with pytest.raises(oa.OpenAIError) as e:
        _parse({"messages": messages}, "chat")
    assert e.value.param == param


def test_fields_map_onto_generation_settings():
    p = _parse({"prompt": ["x [MASK] y", "z"], "n": 2, "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                "seed": 7, "stop": ["\n", "."], "logprobs": 2, "echo": True, "user": "ignored",
                "max_tokens_extra": None, "glm": {"top_k": 3}})
    assert [r.id for r in p.requests] == ["r.0", "r.1", "r.2", "r.3"]
    assert [r.text for r in p.requests] == ["x [MASK] y", "x [MASK] y", "z", "z"]
    assert [r.config.seed for r in p.requests] == [7, 8, 7, 8]
    c = p.requests[0].config
    assert (c.strategy, c.temperature, c.top_p, c.top_k, c.max_new_tokens, c.stop, c.logprobs) == \
        ("sample", 0.5, 0.9, 3, 5, ("\n", "."), 2)
    assert p.infill == [True, False] and p.echo and p.prompt_of(3) == 1
    greedy = _parse({"prompt": "a", "temperature": 0, "max_tokens": None, "n": None, "stop": None})
    assert greedy.requests[0].config.strategy == "greedy" and greedy.requests[0].config.max_new_tokens == 8
    beam = _parse({"prompt": "a", "temperature": 0.7, "glm": {"strategy": "beam", "num_beams": 2}})
    assert beam.requests[0].config.strategy == "beam"  # glm settings win
    suffix = _parse({"prompt": "one two", "suffix": " four"})
    assert suffix.prompts == ["one two[MASK] four"] and suffix.infill == [False]


def test_chat_content_parts_are_read_as_text_and_logprobs_flags():
    p = _parse({"messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}],
                "logprobs": True, "top_logprobs": 3}, "chat")
    assert p.prompts == ["be brief\na b"] and p.requests[0].config.logprobs == 3
    assert _parse({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "chat").logprobs == 0
    with pytest.raises(oa.OpenAIError, match="top_logprobs needs logprobs"):
        _parse({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "chat")


def _result(rid: str, blanks: list[str], text: str) -> Result:
    lps = [TokenLogprob(5, "ab", -0.5, [(5, "ab", -0.5), (6, "c", -1.5)]), TokenLogprob(7, "d", -0.1, [])]
    return Result(rid, text=text, blanks=blanks, blanks_token_ids=[[5, 7]], finish_reason="stop", prompt_tokens=4,
                  completion_tokens=2, pieces=[("x ", False), (blanks[0], True)], logprobs=lps)


def test_responses_answer_infills_with_the_text_and_continuations_with_the_blank():
    p = _parse({"prompt": ["x [MASK]", "x"], "logprobs": 1, "echo": True})
    results = [_result("r.0", ["abd"], "x abd"), _result("r.1", ["abd"], "x abd")]
    body = responses.response_body(p, results, "cmpl-1", 0, "demo")
    first, second = body["choices"]
    assert first["text"] == "x abd" and second["text"] == "xabd"  # echo puts the prompt first
    assert second["logprobs"]["text_offset"] == [1, 3] and second["logprobs"]["top_logprobs"][0] == {"ab": -0.5, "c": -1.5}
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
    chat = _parse({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1}, "chat")
    body = responses.response_body(chat, [_result("r.0", ["abd"], "x abd")], "chat-1", 0, "demo")
    assert body["choices"][0]["message"]["content"] == "abd"
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["bytes"] == [97, 98]
    refused = Result.failed("r.0", "prompt is 900 tokens with sop, more than the model's max length 512",
                            CONTEXT_LENGTH)
    with pytest.raises(oa.OpenAIError) as e:
        responses.response_body(p, [refused, refused], "x", 0, "demo")
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"


def test_every_bad_line_gets_its_own_record_and_the_job_goes_on(tmp_path):
    good = {"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": {"prompt": "a"}}
    lines = [good, {**good, "custom_id": "s", "body": {"prompt": "a", "stop": 5}},
             {**good, "custom_id": "g", "body": {"prompt": "a", "glm": "beam"}}, [1, 2], 7, "{broken",
             {**good, "custom_id": "c", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}},
             {**good, "custom_id": "u", "url": "/v1/edits"}, {**good, "custom_id": 5}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    items = list(read_items(path, DEFAULT))
    assert [i.key for i in items] == ["ok", "s", "g", "line-4", "line-5", "line-6", "c", "u", "line-9"]
    assert [bool(i.error) for i in items] == [False, True, True, True, True, True, False, True, True]
    for item in items:
        if item.error:
            out = openai_record(item, [])
            err = out["response"]["body"]["error"]
            assert out["response"]["status_code"] == 400 and err["type"] and err["code"] and err["message"]
            assert out["custom_id"] == item.key and err["message"].startswith(f"line {item.line}: ")
    assert items[1].openai_error.param == "stop" and items[2].openai_error.param == "glm"
    assert "JSON object, not a list" in items[3].error and items[5].openai_error.code == "invalid_json"
    assert items[6].requests[0].text == "hi"


@pytest.mark.parametrize("line, words", [
    ('{"id": "a", "prompt": 5}', "'prompt' must be a string"),
    ('{"id": "a", "prompt": "x", "generation": "beam"}', "'generation' must be an object"),
    ('{"id": "a", "prompt": "x", "generation": {"max_new_tokens": null}}', "max_new_tokens"),
    ('{"id": "a", "prompt": "x", "generation": {"stop": 5}}', "stop"),
    ('[1, 2]', "must be a JSON object, not a list"),
    ('3', "must be a JSON object, not a number"),
    ('{"id": "a", "prompt_token_ids": [1, true]}', "list of integers"),
])
def test_plain_lines_with_wrong_shapes_get_error_records(line, words):
    item = parse_line(3, line, DEFAULT)
    assert item.error and words in item.error and item.error.startswith("line 3: ") and not item.requests
