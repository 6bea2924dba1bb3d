"""Text that UTF-8 cannot hold is refused with the field it was in, nested JSON values included."""
from __future__ import annotations

import json

import pytest

from glm_tp.text.unicode import TextError, check_strings, check_text


def test_check_text_names_the_field_and_passes_good_text():
    assert check_text("naïve 東京", "prompt") == "naïve 東京"
    with pytest.raises(TextError, match=r"prompt: character 2 is U\+D800, a lone surrogate") as e:
        check_text("ab\ud800", "prompt")
    assert e.value.field == "prompt"
    str(e.value).encode("utf-8")  # the message itself can be written anywhere


@pytest.mark.parametrize("line, field", [
    ('{"id": "\\ud800", "prompt": "x"}', "id"),
    ('{"body": {"messages": [{"role": "user", "content": "a"}, {"content": "\\udfff"}]}}', "body.messages[1].content"),
    ('{"\\ud800": 1}', "a key in the object"),
])
def test_check_strings_finds_a_lone_surrogate_anywhere_in_a_json_value(line, field):
    with pytest.raises(TextError) as e:
        check_strings(json.loads(line), "")
    assert e.value.field == field


def test_check_strings_walks_deeper_than_python_recurses():
    deep: object = "\ud800"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(TextError):
        check_strings(deep, "x")
    check_strings({"a": [1, 2.5, None, True, {"b": "ok"}]}, "")
