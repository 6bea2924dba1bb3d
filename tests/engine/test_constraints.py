"""Per-request constraints (engine/constraints.py): a constrained row generates only what its constraint
allows and ends when it says, rows beside it are untouched, and a constraint that fails ends its request only."""
from __future__ import annotations

import pytest

from glm_tp.config import PRESETS
from glm_tp.engine.types import GenerationConfig, Request
from tests.support.engines import causal_checkpoint, engine_for
from tests.support.scripted import Scripted

CFG = PRESETS["tiny-chatglm2"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_tokenizer_file):
    ckpt = causal_checkpoint(tmp_path_factory.mktemp("constraints"))
    return engine_for(ckpt, tiny_tokenizer_file, default=GenerationConfig(max_new_tokens=12), max_batch=4)


def _request(rid: str, script: list[int] | None = None, fail_at: int | None = None, **cfg) -> Request:
    factory = (lambda: Scripted(script, CFG.vocab_size, fail_at)) if script is not None else None
    return Request(rid, "one two three", config=GenerationConfig(max_new_tokens=12, **cfg), constraint=factory)


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_a_constrained_row_writes_its_script_and_ends_beside_a_free_row(engine, strategy):
    script = [7, 3, 11, 3, 40]
    free_alone = engine.generate([_request("free")])[0]
    constrained, free = engine.generate([_request("c", script, strategy=strategy), _request("free")])
    assert constrained.blanks_token_ids[0] == script and constrained.finish_reason == "stop"
    assert free.token_ids == free_alone.token_ids  # the row beside it is untouched


def test_a_constraint_that_fails_ends_its_request_only(engine):
    broken, ok = engine.generate([_request("broken", [7, 3, 11], fail_at=1), _request("ok", [5, 6])])
    assert broken.finish_reason == "error" and "the grammar broke" in broken.error
    assert ok.blanks_token_ids[0] == [5, 6] and ok.finish_reason == "stop"


def test_a_constraint_that_allows_nothing_is_an_error_not_token_0(engine):
    result = engine.generate([_request("nothing", [], min_new_tokens=2)])[0]
    assert result.finish_reason == "error" and "allows no token" in result.error


def test_beam_search_with_a_constraint_is_refused(engine):
    result = engine.generate([_request("beam", [7], strategy="beam", num_beams=2)])[0]
    assert result.finish_reason == "error" and "strategy=beam" in result.error
