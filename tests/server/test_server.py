"""The OpenAI-compatible server on the bundled demo model, through the official `openai` client and raw HTTP:
answers equal the JSONL batch runner's, streaming, errors, 32 concurrent clients, disconnects, metrics."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from glm_tp.cli.settings import CONFIG_DIR
from glm_tp.dev.demo_corpus import held_out
from glm_tp.server.app import ServerSettings
from tests.support import ROOT
from tests.support.server import (
    DEMO,
    count_steps,
    demo_engine,
    slowed,
    start,
    watch_handles,
)
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def server():
    live = start(demo_engine())
    yield live
    live.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


RECALL, CYCLE = held_out("recall", 3), held_out("cycle", 3)
BODIES = [  # (url, body) pairs the server and the batch runner both answer
    ("/v1/completions", {"model": "demo", "prompt": [RECALL[0].prompt, CYCLE[0].prompt], "max_tokens": 8}),
    ("/v1/completions", {"model": "demo", "prompt": "list : kite yak red bag . again :", "n": 2,
                         "temperature": 0.9, "seed": 11, "max_tokens": 10}),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": CYCLE[1].prompt}],
                              "max_tokens": 8}),
    ("/v1/completions", {"model": "demo", "prompt": "list : drum key dog root elk . again :", "max_tokens": 12,
                         "glm": {"strategy": "beam", "num_beams": 3}}),
    ("/v1/completions", {"model": "demo", "prompt": "list : drum key dog root elk . again :", "max_tokens": 12,
                         "stop": [" root"], "logprobs": 2, "echo": True}),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": RECALL[2].prompt}],
                              "max_tokens": 4, "logprobs": True, "top_logprobs": 2}),
]


def _texts(body: dict) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in body["choices"]]


def _same_logprobs(a: object, b: object) -> None:
    """The same tokens; values equal up to float noise (a batch of other requests rounds differently)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_logprobs(a[k], b[k])
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_logprobs(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-3)
    else:
        assert a == b


def test_answers_equal_the_batch_runners(client, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"custom_id": str(i), "method": "POST", "url": url, "body": body}) + "\n"
                           for i, (url, body) in enumerate(BODIES)))
    subprocess.run([sys.executable, "-m", "glm_tp.generate", f"checkpoint={DEMO}", f"input={src}", f"output={out}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    batch = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, out.read_text().splitlines())}
    for i, (url, body) in enumerate(BODIES):
        extra = {"extra_body": {"glm": body["glm"]}} if "glm" in body else {}
        plain = {k: v for k, v in body.items() if k != "glm"}
        if url == "/v1/completions":
            got = client.completions.create(**plain, **extra).model_dump()
        else:
            got = client.chat.completions.create(**plain, **extra).model_dump()
        assert _texts(got) == _texts(batch[str(i)]), url
        assert [c["finish_reason"] for c in got["choices"]] == [c["finish_reason"] for c in batch[str(i)]["choices"]]
        assert {k: got["usage"][k] for k in batch[str(i)]["usage"]} == batch[str(i)]["usage"]
        for mine, theirs in zip(got["choices"], batch[str(i)]["choices"]):
            _same_logprobs(mine["logprobs"], theirs["logprobs"])
    first = client.completions.create(**BODIES[0][1])
    assert [c.text for c in first.choices] == [RECALL[0].prompt.replace("[MASK]", RECALL[0].answers[0]),
                                               CYCLE[0].prompt.replace("[MASK]", CYCLE[0].answers[0])]
    assert first.choices[0].model_extra["blanks"] == RECALL[0].answers  # infilling clients read the blanks


def test_streaming_completions_and_chat_with_usage(client):
    body = {"model": "demo", "prompt": "list : cup fire drum star fox . again :", "max_tokens": 12, "n": 2,
            "temperature": 0.7, "seed": 3}
    whole = client.completions.create(**body)
    parts: dict[int, str] = {0: "", 1: ""}
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        for choice in c.choices:
            parts[choice.index] += choice.text
    assert [parts[0], parts[1]] == [c.text for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    assert {c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason} == \
        {whole.choices[0].finish_reason}
    beam = {"model": "demo", "prompt": "list : cup fire drum star fox . again :", "max_tokens": 12,
            "extra_body": {"glm": {"strategy": "beam", "num_beams": 3}}}
    streamed = "".join(c.choices[0].text for c in client.completions.create(**beam, stream=True) if c.choices)
    assert streamed == client.completions.create(**beam).choices[0].text != ""  # beams arrive at the end
    chat_body = {"model": "demo", "messages": [{"role": "user", "content": "list : a b c d . again :"}],
                 "max_tokens": 12}
    whole_chat = client.chat.completions.create(**chat_body)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**chat_body, stream=True) if c.choices)
    assert streamed == whole_chat.choices[0].message.content


def test_stop_strings_and_logprobs(client):
    full = client.completions.create(model="demo", prompt="list : drum key dog root elk . again :", max_tokens=12)
    words = full.choices[0].text.split()
    assert len(words) >= 3
    cut = client.completions.create(model="demo", prompt="list : drum key dog root elk . again :", max_tokens=12,
                                    stop=[words[2]], logprobs=2)
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and words[2] not in choice.text and choice.text.strip()
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": CYCLE[2].prompt}],
                                          max_tokens=4, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_bad_requests_get_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="a", max_tokens=4, extra_body={"stop": 5})
    assert e.value.body["param"] == "stop" and "stop must be" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="a", n=17)
    assert e.value.body["param"] == "n"
    for prompt, max_tokens in (("one " * 200, 4), ("one two", 200)):  # the prompt, or prompt + answer, too long
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="demo", prompt=prompt, max_tokens=max_tokens)
        assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"glm": {"strategy": "beam", "num_beams": 0}})
    assert e.value.body["param"] == "glm" and "num_beams" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="a")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.post("/nowhere", body={}, cast_to=object)
    raw = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(server.url + "/v1/completions", content=b" " * (5 << 20), timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    chunked = httpx.post(server.url + "/v1/completions", content=iter([b" " * (1 << 20)] * 5), timeout=30)  # no length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
    wrong_method = httpx.get(server.url + "/v1/completions", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]
    assert client.models.list().data[0].id == "demo"


def test_api_key_is_required_when_set():
    live = start(demo_engine(), ServerSettings(port=0, model_name="demo", api_key="sesame"))
    try:
        wrong = openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="demo", prompt="a", max_tokens=2)
        missing = httpx.get(live.url + "/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        for header in ("bearer sesame", "BEARER  sesame"):  # the scheme's case is free (RFC 9110)
            assert httpx.get(live.url + "/v1/models", headers={"Authorization": header}).status_code == 200
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": "Basic sesame"}).status_code == 401
        right = openai.OpenAI(base_url=live.url + "/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model="demo", prompt=RECALL[1].prompt, max_tokens=4).choices[0].text
        assert httpx.get(live.url + "/health").status_code == 200  # probes need no key
    finally:
        live.close()


def _mixed_call(url: str, i: int) -> tuple[str, list[str], str]:
    """One client's request and its expected answer (the demo model knows every held-out answer)."""
    case = (RECALL + CYCLE)[i % 6]
    expected = case.prompt.replace("[MASK]", case.answers[0])
    if i % 3 == 0:
        body = {"model": "demo", "messages": [{"role": "user", "content": case.prompt}], "max_tokens": 6}
        return f"{url}/v1/chat/completions", body, expected
    return f"{url}/v1/completions", {"model": "demo", "prompt": case.prompt, "max_tokens": 6,
                                     "stream": i % 2 == 0}, expected


def _run_call(url: str, body: dict) -> str:
    if not body.get("stream"):
        r = httpx.post(url, json=body, timeout=120)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content"))
    final = None
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line[6:])["choices"]:
            if choice.get("pieces"):
                final = "".join(text for text, _ in choice["pieces"])
    return final


def test_32_concurrent_clients_and_a_disconnect(server):
    answers: dict[int, str] = {}
    errors: list[str] = []

    def client_thread(i: int) -> None:
        url, body, expected = _mixed_call(server.url, i)
        try:
            answers[i] = (_run_call(url, body), expected)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"client {i}: {e!r}")

    def quitter() -> None:  # reads the first event of a long stream, then hangs up
        body = {"model": "demo", "prompt": "one two three", "max_tokens": 60, "stream": True,
                "glm": {"min_new_tokens": 60}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            next(r.iter_lines())

    bad_statuses: list[int] = []

    def bad_client(body: dict) -> None:  # bad requests among the good ones harm nobody
        bad_statuses.append(httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    threads.insert(5, threading.Thread(target=quitter))
    for k, body in enumerate([{"model": "demo", "prompt": "a", "stop": 5}, {"model": "demo", "prompt": "one " * 200},
                              {"model": "demo", "prompt": "a", "glm": {"strategy": "beam", "num_beams": "x"}}]):
        threads.insert(3 + 9 * k, threading.Thread(target=bad_client, args=(body,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert bad_statuses == [400, 400, 400]
    assert len(answers) == 32 and all(got == expected for got, expected in answers.values()), answers
    metrics = httpx.get(server.url + "/metrics").text
    assert "glm_tp_time_to_first_token_seconds_count" in metrics and "glm_tp_requests_waiting" in metrics
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("glm_tp_time_to_first_token_seconds_count"))
    assert count >= 32
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_full_queue_answers_503_with_retry_after():
    live = start(demo_engine(), ServerSettings(port=0, model_name="demo", max_waiting=2))
    try:
        statuses: list[tuple[int, str | None]] = []

        def call() -> None:
            r = httpx.post(live.url + "/v1/completions", timeout=120,
                           json={"model": "demo", "prompt": "one two", "max_tokens": 20, "glm": {"min_new_tokens": 20}})
            statuses.append((r.status_code, r.headers.get("retry-after")))
        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        busy = [s for s in statuses if s[0] == 503]
        assert busy and all(retry == "1" for _, retry in busy)
        assert {s for s, _ in statuses} <= {200, 503} and any(s == 200 for s, _ in statuses)
    finally:
        live.close()


def test_loadgen_measures_a_running_server(server):
    sys.path.insert(0, str(ROOT / "tools"))
    import asyncio

    from loadgen import run_level, table

    row = asyncio.run(run_level(server.url, "demo", concurrency=2, total=4, max_tokens=6, min_tokens=6))
    assert row["requests"] == 4 and row["tokens_s"] > 0 and 0 < row["ttft_p50"] <= row["ttft_p99"]
    assert "| 2 | 4 |" in table([row])


def _idle(server) -> bool:
    """The engine has no request left."""
    return _queue(server.coordinator.load()) == (0, 0)


def _metric(url: str, name: str) -> float:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(name + " ")), 0.0)


def test_a_client_that_hangs_up_cancels_its_request():
    engine = slowed(demo_engine(), 0.05)  # 60 tokens take 3 s or more
    steps = count_steps(engine)
    live = start(engine)
    handles = watch_handles(live.coordinator)
    long = {"model": "demo", "prompt": "one two three", "max_tokens": 60, "glm": {"min_new_tokens": 60}}
    try:
        with httpx.stream("POST", live.url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            next(r.iter_lines())  # generation has started; hang up
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up after 0.5 s: the answer takes 3 s or more
            httpx.post(live.url + "/v1/completions", json=long, timeout=0.5)
        results = [h.result(timeout=120) for h in handles]
        assert [r.finish_reason for r in results] == ["cancelled", "cancelled"]
        assert all(r.completion_tokens < 60 for r in results)
        wait_until(lambda: _idle(live), 120, "the engine to have no request left")
        assert steps[0] < 60  # the rows were freed: neither answer ran on to its 60 tokens
        wait_until(lambda: _metric(live.url, 'glm_tp_requests_total{finish_reason="cancelled"}') == 2, 60,
                   "/metrics to count both cancelled requests")
    finally:
        live.close()


def test_a_request_over_its_time_limit_gets_504():
    live = start(slowed(demo_engine(), 0.05), ServerSettings(port=0, model_name="demo", request_timeout_s=0.3))
    handles = watch_handles(live.coordinator)
    try:
        r = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "model": "demo", "prompt": "one two", "max_tokens": 60, "n": 4, "glm": {"min_new_tokens": 60}})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert len(handles) == 4 and all(h.result(timeout=120).finish_reason == "cancelled" for h in handles)
    finally:
        live.close()


@pytest.mark.parametrize("key, value, words", [
    ("port", 70000, "0..65535"), ("port", "x", "whole number"), ("api_key", 123, "non-empty string"),
    ("max_waiting", 0, ">= 1"), ("request_timeout_s", -1, "> 0"), ("host", "", "non-empty string"),
])
def test_bad_server_settings_are_refused_before_loading(key, value, words):
    from omegaconf import OmegaConf

    from glm_tp.cli.settings import UsageError, check_server

    server = OmegaConf.load(CONFIG_DIR / "generate.yaml").server
    check_server(server)  # the defaults pass
    server[key] = value
    with pytest.raises(UsageError, match=f"server.{key}=.*{words}"):
        check_server(server)


HOSTILE = [  # (raw body, the param named): values that once reached torch on the engine thread, or broke parsing
    ('{"prompt": "a", "glm": {"strategy": "sample", "top_k": 9223372036854775807}}', "glm"),
    ('{"prompt": "a", "glm": {"strategy": "sample", "top_k": 9223372036854775808}}', "glm"),
    ('{"prompt": "a", "glm": {"strategy": "sample", "top_k": 1e20}}', "glm"),
    ('{"prompt": "a", "glm": {"strategy": "beam", "num_beams": 2, "length_penalty": 1e308}}', "glm"),
    ('{"prompt": "a", "glm": {"strategy": "sample", "temperature": 1e308}}', "glm"),
    ('{"prompt": "a", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "a", "max_tokens": 1' + "0" * 400 + "}", "max_tokens"),
    ('{"prompt": "a", "user": 1' + "0" * 5000 + "}", None),
    ('{"prompt": "a", "user": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
    ('{"prompt": "a\\ud800 b"}', "prompt"),
    ('{"prompt": ["ok", "\\udfff"]}', "prompt[1]"),
]


def test_hostile_values_are_400s_and_the_server_stays_healthy(server):
    for raw, param in HOSTILE:
        reply = httpx.post(server.url + "/v1/completions", content=raw.encode(), timeout=60,
                           headers={"content-type": "application/json"})
        assert reply.status_code == 400, (raw[:80], reply.text[:300])
        assert reply.json()["error"]["param"] == param, raw[:80]
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                      content=b'{"messages": [{"role": "user", "content": "x\\ud800"}]}')
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages[0].content"
    assert httpx.get(server.url + "/health", timeout=60).json()["status"] == "ok"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "list : kite yak . again :", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]


def test_logprobs_under_top_k_and_top_p_are_finite_json(server):
    body = {"prompt": "list : kite yak red . again :", "max_tokens": 4, "logprobs": 5, "top_p": 0.5, "seed": 3,
            "glm": {"top_k": 2}}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert whole.status_code == 200, whole.text[:300]
    values = [v for top in whole.json()["choices"][0]["logprobs"]["top_logprobs"] for v in top.values()]
    assert len(values) > 4 and all(v >= -9999.0 for v in values) and min(values) == -9999.0
    streamed = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=60).text
    assert "Infinity" not in streamed and "NaN" not in streamed and streamed.rstrip().endswith("[DONE]")


def test_prompts_as_token_ids_answer_as_their_text_does(server, client):
    tok = server.coordinator.engine.tok
    texts = ["list : kite yak red . again :", "days : tuesday wednesday"]
    ids = [tok.encode(t) for t in texts]
    by_text = client.completions.create(model="demo", prompt=texts, max_tokens=6)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6)  # a list of lists
    one = client.completions.create(model="demo", prompt=ids[0], max_tokens=6, echo=True)  # one list of ids
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens
    assert one.choices[0].text == tok.decode(ids[0]) + " " + by_text.choices[0].text
    for bad in ([], [[]], [1, "a"], [True], [-1], [[1], "a"]):
        reply = httpx.post(server.url + "/v1/completions", json={"prompt": bad}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", bad
    outside = httpx.post(server.url + "/v1/completions", json={"prompt": [10 ** 6]}, timeout=60)
    assert outside.status_code == 400 and "outside the vocabulary" in outside.json()["error"]["message"]


def _raw(url: str, data: bytes) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_slow_and_silent_clients_are_timed_out():
    live = start(demo_engine(), ServerSettings(port=0, model_name="demo", read_timeout_s=1.0))
    try:
        assert _raw(live.url, b"").startswith(b"HTTP/1.1 408")  # connects and sends nothing
        assert _raw(live.url, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n").startswith(b"HTTP/1.1 408")
        short = _raw(live.url, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                               b"content-length: 100\r\nconnection: close\r\n\r\n{\"prompt\": ")
        assert short.startswith(b"HTTP/1.1 408") and b"read_timeout_s" in short
        assert httpx.get(live.url + "/health", timeout=60).json()["status"] == "ok"
    finally:
        live.close()


def test_logprob_tokens_add_up_to_the_text(client):
    done = client.completions.create(model="demo", prompt="list : kite yak red bag . again :", max_tokens=8,
                                     logprobs=1)
    choice = done.choices[0]
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert " " in choice.text and "".join(tokens) == choice.text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "list : drum key . again :"}],
                                          max_tokens=6, logprobs=True, top_logprobs=1)
    entries = chat.choices[0].logprobs.content
    assert all(e.bytes == list(e.token.encode()) for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == chat.choices[0].message.content


def test_echo_keeps_the_space_between_prompt_and_answer_and_streams_alike(client):
    prompt = "days : tuesday"
    plain = client.completions.create(model="demo", prompt=prompt, max_tokens=3).choices[0].text
    echoed = client.completions.create(model="demo", prompt=prompt, max_tokens=3, echo=True, logprobs=0).choices[0]
    assert plain and not plain.startswith(" ") and echoed.text == f"{prompt} {plain}"
    assert echoed.logprobs.text_offset[0] == len(prompt) + 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt=prompt, max_tokens=3, echo=True, stream=True) if c.choices)
    assert streamed == echoed.text


def test_the_prompt_comes_back_as_given(client):
    prompt = "Zé  list : kite [MASK] red  ~"  # characters the demo tokenizer lacks, doubled spaces
    text = client.completions.create(model="demo", prompt=prompt, max_tokens=3).choices[0].text
    head, tail = prompt.split("[MASK]")
    assert text.startswith(head) and text.endswith(tail) and len(text) > len(prompt) - len("[MASK]")


def _queue(load: dict) -> tuple[int, int]:
    """Requests waiting and running, from the coordinator's load (which also carries the engine's stats)."""
    return load["waiting"], load["running"]
