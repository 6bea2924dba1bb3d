"""Every generation setting's bounds, from the one table (engine/types.LIMITS): values a client can send that
would overflow torch or Python floats are refused with the setting's name and range."""
from __future__ import annotations

import pytest

from glm_tp.engine.types import LIMITS, MAX_SEED, GenerationConfig

HUGE = [
    ("top_k", 9223372036854775807), ("top_k", 2 ** 63), ("top_k", 1e20), ("top_k", "9223372036854775807"),
    ("temperature", 1e308), ("length_penalty", 1e308), ("length_penalty", -1e308), ("num_beams", 10 ** 9),
    ("seed", 2 ** 64), ("seed", -1), ("max_new_tokens", 10 ** 400), ("no_repeat_ngram_size", 2 ** 62),
    ("min_new_tokens", 10 ** 30), ("logprobs", 21), ("temperature", "1e999"), ("seed", 10 ** 5000),
]


@pytest.mark.parametrize("key,value", HUGE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(HUGE)])
def test_values_out_of_range_are_refused_naming_the_setting(key, value):
    with pytest.raises(ValueError) as e:
        GenerationConfig().updated(**{key: value})
    message = str(e.value)
    assert key in message and len(message) < 200


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_each_bound_itself_is_allowed(key):
    limit = LIMITS[key]
    top = int(limit.hi) if key != "temperature" else limit.hi
    extra = {"max_new_tokens": top} if key == "min_new_tokens" else {}
    assert getattr(GenerationConfig().updated(**extra, **{key: top}), key) == top


def test_integers_are_exact():
    assert GenerationConfig().updated(seed=MAX_SEED).seed == MAX_SEED  # no float round trip to 2**63
    assert GenerationConfig().updated(seed=str(MAX_SEED)).seed == MAX_SEED
    with pytest.raises(ValueError, match="seed"):
        GenerationConfig().updated(seed=MAX_SEED + 1)
