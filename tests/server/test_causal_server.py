"""The server on a causal chat model (a random 'tiny-chatglm2' with a chat format): completions continue the
prompt, a blank is refused, the chat route runs the chat format's ids verbatim, and /v1/models tells the
playground which views the model has."""
from __future__ import annotations

import json

import httpx
import pytest

from glm_tp.engine.types import GenerationConfig, Request
from tests.support.server import causal_engine, demo_engine, start, watch_handles


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("causal-server")


@pytest.fixture(scope="module")
def live(root, tiny_tokenizer_file):
    server = start(causal_engine(root, tiny_tokenizer_file))
    yield server
    server.close()


@pytest.fixture(scope="module")
def direct(root, tiny_tokenizer_file):
    """A second engine on the same checkpoint, run directly: what the server should answer."""
    return causal_engine(root, tiny_tokenizer_file)


def _post(live, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/{route}", json=body, timeout=60)


def test_models_say_whether_the_model_chats_and_fills_blanks(live):
    assert httpx.get(live.url + "/v1/models").json()["data"][0]["glm"] == {"chat": True, "blank_infilling": False,
                                                                          "tool_calls": False, "structured_output": True}
    demo = start(demo_engine())
    try:
        assert httpx.get(demo.url + "/v1/models").json()["data"][0]["glm"] == {"chat": False, "blank_infilling": True,
                                                                              "tool_calls": False, "structured_output": True}
    finally:
        demo.close()


def test_completions_continue_the_prompt_and_a_blank_is_refused(live, direct):
    prompt = "one two three"
    want = direct.generate([Request("d", prompt, config=GenerationConfig(max_new_tokens=8))])[0]
    body = _post(live, "completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    assert body["choices"][0]["text"] == want.blanks[0] and body["usage"]["prompt_tokens"] == want.prompt_tokens
    echoed = _post(live, "completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "echo": True}).json()
    assert echoed["choices"][0]["text"] == want.text and want.text.startswith(prompt)
    refused = _post(live, "completions", {"prompt": "one [MASK] three", "max_tokens": 8})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_prompt"
    assert "no blank infilling" in refused.json()["error"]["message"]


def test_n_choices_sample_with_their_own_seeds(live, direct):
    body = _post(live, "completions", {"prompt": "monday", "max_tokens": 10, "temperature": 1.0, "seed": 5,
                                       "n": 2}).json()
    sampled = GenerationConfig(strategy="sample", temperature=1.0, max_new_tokens=10)
    want = [direct.generate([Request("d", "monday", config=sampled.updated(seed=s))])[0].blanks[0] for s in (5, 6)]
    assert [c["text"] for c in body["choices"]] == want and want[0] != want[1]


def test_the_chat_route_runs_the_chat_formats_ids_verbatim(live):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"},
                {"role": "assistant", "content": "three"}, {"role": "user", "content": "four five"}]
    handles = watch_handles(live.coordinator)
    chat = _post(live, "chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0}).json()
    ids = live.coordinator.chat_format(messages)
    assert handles[0].request.token_ids == ids and handles[0].result().token_ids[:len(ids)] == ids
    as_ids = _post(live, "completions", {"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == as_ids["choices"][0]["text"]
    with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(c["delta"].get("content", "") for e in events for c in json.loads(e)["choices"])
    assert streamed == chat["choices"][0]["message"]["content"] != ""
