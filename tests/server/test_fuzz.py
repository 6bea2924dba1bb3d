"""The server driven by its own published schema: schemathesis generates bodies for every route from
/openapi.json, valid ones and, in negative mode, invalid ones. None may get a 5xx, and the server must still
be healthy and answer afterwards."""
from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test extra: pip install -e .[test]")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from tests.support.server import demo_engine, start  # noqa: E402

EXAMPLES = 40  # per route and mode: bounded, so CI time stays bounded


@pytest.fixture(scope="module")
def server():
    live = start(demo_engine(max_new_tokens=4))
    yield live
    live.close()


def test_the_schema_is_published_and_names_the_bounds(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=60).json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["glm"]["properties"]["top_k"]["maximum"] == 1 << 20
    assert "/v1/chat/completions" in schema["paths"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_body_gets_a_server_error(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.generation.update(modes=[mode])
    seen: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a route that takes no input

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            response = case.call(base_url=server.url, timeout=120)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
        call()
    assert seen and (mode is GenerationMode.NEGATIVE or 200 in seen)
    assert httpx.get(server.url + "/health", timeout=60).json()["status"] == "ok"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "list : kite yak . again :"}, timeout=60)
    assert ok.status_code == 200
