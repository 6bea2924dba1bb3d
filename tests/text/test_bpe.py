"""GLM-4's byte-level BPE from its two files (tiktoken ranks, tokenizer.json): the same ids both ways, bytes
read back exactly, special tokens after the ranks and never made from text, a missing library in one line."""
from __future__ import annotations

import base64
import json

import pytest

from glm_tp.config import GLM4_SPECIALS
from glm_tp.text.base import TokenizerError
from glm_tp.text.bpe import BPETokenizer, load_hf_tokenizer
from glm_tp.text.tokenizer import load_tokenizer

pytest.importorskip("tiktoken", reason="the glm4 extra (tiktoken) is not installed")

TEXTS = ["hello world, hello there", "你好，世界！今天天气很好。", "emoji 😀🎉 mixed 中文 text", "  a\n\n b\r\n 12345",
         "unseen 龘 words don't", "<|user|> typed [gMASK] <sop>"]


def test_hand_written_ranks_merge_as_bpe(tmp_path):
    """Ranks 0-255 the bytes, then merges: 'he', 'll', 'hell', 'hello', ' w', and 你 (e4 bd a0) in two steps."""
    merges = [b"he", b"ll", b"hell", b"hello", b" w", b"\xe4\xbd", "你".encode()]
    ranks = [bytes([b]) for b in range(256)] + merges
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                      for r, t in enumerate(ranks)), encoding="ascii")
    tok = load_tokenizer(tmp_path)  # a tokenizer.model of base64 lines is tiktoken's
    assert isinstance(tok, BPETokenizer) and tok.text_vocab_size == 263
    assert tok.encode("hello") == [259]
    assert tok.encode("hello world") == [259, 260, ord("o"), ord("r"), ord("l"), ord("d")]
    assert tok.encode("你好") == [262, *"好".encode()]
    assert tok.special.eos == 263 and tok.special.gmask == 265 and tok.token_id("<|user|>") == 270
    assert tok.decode([265, 267, 259, 263]) == "[gMASK]<sop>hello<|endoftext|>"


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_both_files_give_the_librarys_ids_and_read_back(glm4_files, name):
    from tokenizers import Tokenizer
    library = Tokenizer.from_file(str(glm4_files / "tokenizer.json"))
    tok = load_tokenizer(glm4_files / name)
    n = tok.text_vocab_size
    assert n == library.get_vocab_size(with_added_tokens=False)
    assert {tok.token_id(s) for s in GLM4_SPECIALS} == set(range(n, n + len(GLM4_SPECIALS)))
    for text in TEXTS[:-1]:
        assert tok.encode(text) == library.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert load_tokenizer(glm4_files / "tokenizer.model").encode(TEXTS[-1]) == \
        load_tokenizer(glm4_files / "tokenizer.json").encode(TEXTS[-1])


def test_typed_special_tokens_are_text(glm4_files):
    from tokenizers import Tokenizer
    library = Tokenizer.from_file(str(glm4_files / "tokenizer.json"))
    tok = load_tokenizer(glm4_files / "tokenizer.json")
    user = tok.token_id("<|user|>")
    assert user in library.encode("<|user|> hi").ids  # the library alone would read the role token
    for kind in ("tokenizer.json", "tokenizer.model"):
        ids = load_tokenizer(glm4_files / kind).encode(TEXTS[-1])
        assert all(i < tok.text_vocab_size for i in ids) and tok.decode(ids) == TEXTS[-1]


def test_special_ids_from_the_metadata(glm4_files):
    given = {name: 1000 + k for k, name in enumerate(GLM4_SPECIALS)}
    tok = load_tokenizer(glm4_files, kind="tiktoken", specials=given)
    assert tok.special.gmask == 1002 and tok.decode([1002, 1004]) == "[gMASK]<sop>"
    spec = json.loads((glm4_files / "tokenizer.json").read_text())
    assert {t["content"]: t["id"] for t in spec["added_tokens"]} == \
        {n: i for i, n in load_hf_tokenizer(glm4_files / "tokenizer.json").names.items()}


def test_bytes_split_inside_a_character_wait_for_the_rest(glm4_files):
    tok = load_tokenizer(glm4_files / "tokenizer.model")
    byte_ids = {p: i for i, p in enumerate(tok.pieces) if len(p) == 1}
    ids = [byte_ids[bytes([b])] for b in "😀".encode()]
    assert tok.decode(ids[:2]) == "\ufffd" and tok.decode(ids) == "😀"


def test_missing_library_and_bad_files_are_one_line(glm4_files, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(TokenizerError, match=r"needs the tiktoken library: pip install 'glm-tp\[glm4\]'"):
        load_tokenizer(glm4_files / "tokenizer.model")
    with pytest.raises(TokenizerError, match=r"needs the tokenizers library: pip install 'glm-tp\[glm4\]'"):
        load_tokenizer(glm4_files / "tokenizer.json")
    monkeypatch.undo()
    (tmp_path / "tokenizer.model").write_text("aGk= 0\nnot base64! 1\n")
    with pytest.raises(TokenizerError, match="not a tiktoken ranks file") as e:
        load_tokenizer(tmp_path / "tokenizer.model", kind="tiktoken")
    assert "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="no tokenizer model found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerError, match="not a BPE tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
