"""StopStream on a tokenizer whose ids decode to fixed pieces: what may still change waits, a stop string cuts."""
from __future__ import annotations

from glm_tp.text.stream import StopStream, find_stop, prefix_overlap
from glm_tp.text.tokenizer import REPLACEMENT

PIECES = ["ab", " c", "E", "N", "D", "x", REPLACEMENT]


class PieceTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(PIECES[i] for i in ids)


def _safe_texts(stream: StopStream, ids: list[int]) -> list[tuple[str, int | None]]:
    return [stream.update(ids[:n]) for n in range(1, len(ids) + 1)]


def test_a_possible_stop_string_waits_and_a_whole_one_cuts():
    stream = StopStream(PieceTokenizer(), ["END"])
    assert _safe_texts(stream, [0, 1, 2, 3, 4, 5]) == [
        ("ab", None), ("ab c", None), ("ab c", None), ("ab c", None), ("ab c", 4), ("ab c", 4)]
    assert stream.cut == 4
    assert stream.trim([0, 1, 2, 3, 4, 5], 4) == ([0, 1], "ab c")


def test_a_false_start_is_released():
    stream = StopStream(PieceTokenizer(), ["END"])
    assert _safe_texts(stream, [2, 3, 5]) == [("", None), ("", None), ("ENx", None)]
    assert stream.cut is None


def test_an_unfinished_character_waits():
    stream = StopStream(PieceTokenizer(), [])
    assert _safe_texts(stream, [0, 6]) == [("ab", None), ("ab", None)]


def test_helpers():
    assert find_stop("a stop or end", ["end", "stop"]) == 2 and find_stop("none", ["x"]) is None
    assert prefix_overlap("abEN", "END") == 2 and prefix_overlap("abc", "END") == 0
