"""StopStream on a tokenizer whose ids decode to fixed pieces: what may still change waits, a stop string cuts."""
from __future__ import annotations

import pytest

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


# -- byte-level BPE and sentencepiece byte pieces: characters split across ids -------------------------------
MIXED = "你好，世界！😀 ok 🎉 中文 END 尾"


class CountingTokenizer:
    """A real tokenizer that records how many ids each decode reads (a stream must not re-read the answer)."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


def _byte_tokenizer(tmp_path):
    """GLM-4's kind of tokenizer with only byte ranks: every character of MIXED past ASCII is split."""
    import base64

    pytest.importorskip("tiktoken", reason="the glm4 extra (tiktoken) is not installed")
    from glm_tp.text.tokenizer import load_tokenizer
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n"
                                                      for b in range(256)), encoding="ascii")
    return load_tokenizer(tmp_path / "tokenizer.model")


def _stream(tok, ids, stops=()):
    """The deltas a job sends (each the new end of the text that can no longer change) and the stream."""
    stream, sent, deltas = StopStream(tok, list(stops)), "", []
    for n in range(1, len(ids) + 1):
        safe, cut = stream.update(ids[:n])
        deltas.append(safe[len(sent):])
        sent = max(sent, safe, key=len)
        if cut is not None:
            break
    return deltas, stream


def test_characters_split_across_byte_tokens_never_show_broken(tmp_path):
    tok = _byte_tokenizer(tmp_path)
    ids = tok.encode(MIXED)
    assert len(ids) == len(MIXED.encode()) and tok.decode(ids) == MIXED
    counting = CountingTokenizer(tok)
    deltas, _ = _stream(counting, ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == MIXED
    assert [d for d in deltas if d][:3] == ["你", "好", "，"]  # each character once its last byte came
    assert max(counting.lengths[8:]) <= 16  # incremental: a few ids per decode, never the whole answer


def test_a_stop_string_of_split_characters(tmp_path):
    tok = _byte_tokenizer(tmp_path)
    ids = tok.encode(MIXED)
    deltas, stream = _stream(tok, ids, ["世界"])
    assert "".join(deltas) == "你好，" and stream.cut == 3
    kept, text = stream.trim(ids, stream.cut)
    assert text == "你好，" and tok.decode(kept) == "你好，"
    deltas, stream = _stream(tok, ids, ["🎉 中"])
    assert "".join(deltas) == MIXED[:MIXED.index("🎉")] and REPLACEMENT not in "".join(deltas)
    assert tok.decode(stream.trim(ids, stream.cut)[0]) == MIXED[:MIXED.index("🎉")]


def test_invalid_bytes_read_as_the_whole_decode_does(tmp_path):
    tok = _byte_tokenizer(tmp_path)
    ids = tok.encode("ab") + [0x80] + tok.encode("c😀")[:-1]  # a stray continuation byte, a cut-off emoji
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == "ab\ufffdc" == tok.decode(ids)[:-1]  # the unfinished emoji still waits


def test_sentencepiece_byte_pieces_and_word_boundaries_stream_incrementally(glm2_tokenizer_file):
    from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
    tok = ChatGLM2Tokenizer(glm2_tokenizer_file)
    text = "hello world, the quick brown fox 😀 jumps over 龘 lazy dogs 你好 hello there " * 3
    ids = tok.encode(text)
    counting = CountingTokenizer(tok)
    deltas, _ = _stream(counting, ids)
    whole = tok.decode(ids)
    assert all(REPLACEMENT not in d for d in deltas) and "".join(deltas) == whole
    assert max(counting.lengths[8:]) <= 16
    words = tok.encode("hello are a hello a are " * 10)  # every id a whole word: each begins a word boundary
    assert all(tok.sp.id_to_piece(i).startswith("\u2581") for i in words)
    counting = CountingTokenizer(tok)
    deltas, _ = _stream(counting, words)
    assert "".join(deltas) == tok.decode(words) and max(counting.lengths[8:]) <= 16


@pytest.mark.parametrize("kind", ["chatglm2", "glm4"])
def test_the_stream_reads_as_the_whole_decode_at_every_token(kind, glm2_tokenizer_file, glm4_files):
    """Any ids (bytes cut anywhere, lone spaces, special tokens among them): at every token TextStream's text is
    the whole list decoded."""
    import random

    from glm_tp.text.stream import TextStream
    from glm_tp.text.tokenizer import load_tokenizer
    tok = load_tokenizer(glm2_tokenizer_file, specials={"[MASK]": 400, "[gMASK]": 401, "[sMASK]": 402, "sop": 403,
                                                        "eop": 404}) \
        if kind == "chatglm2" else load_tokenizer(glm4_files / "tokenizer.model")
    rng = random.Random(0)
    specials = list(tok.names)
    answers = [[rng.choice(range(tok.text_vocab_size)) for _ in range(30)] for _ in range(30)]
    answers += [[rng.choice(specials + a) for _ in range(30)] for a in answers[:10]]
    answers += [tok.encode("你好 😀  ok\n\n 🎉 hello  there  龘")]
    for ids in answers:
        stream = TextStream(tok)
        for n in range(1, len(ids) + 1):
            assert stream.update(ids[:n]) == tok.decode(ids[:n]), (ids, n)
