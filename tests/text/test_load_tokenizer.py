"""The tokenizer a run gets, from its checkpoint's metadata keys (tokenizer, tokenizer_kind, tokenizer_offset,
tokenizer_specials)."""
from __future__ import annotations

import json
import shutil

import pytest

from glm_tp.cli.generate import load_tokenizer_for
from glm_tp.config import CHATGLM2_SPECIALS, CHATGLM3_ROLES, GLM4_SPECIALS, PRESETS
from glm_tp.text.base import TokenizerError
from glm_tp.text.bpe import BPETokenizer
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from glm_tp.text.tokenizer import (
    GLMTokenizer,
    IdsOnlyTokenizer,
    find_model_file,
    load_tokenizer,
)


def _checkpoint(root, meta: dict, *files):
    root.mkdir()
    (root / "model.pt").write_bytes(b"")  # a single-file checkpoint: its metadata sits beside it
    (root / "glm_tp.json").write_text(json.dumps(meta))
    for f in files:
        shutil.copy(f, root / f.name)
    return root


def test_chatglm3_metadata_gives_its_specials_and_roles(tmp_path, glm2_tokenizer_file):
    specials = {n: 400 + k for k, n in enumerate(CHATGLM2_SPECIALS + CHATGLM3_ROLES)}
    root = _checkpoint(tmp_path / "glm3", {"tokenizer": "tokenizer.model", "tokenizer_kind": "sentencepiece",
                                           "tokenizer_offset": 0, "tokenizer_specials": specials}, glm2_tokenizer_file)
    special = PRESETS["tiny-chatglm2"].special
    tok = load_tokenizer_for(root, special, find_model_file(root / "tokenizer.model"))
    assert isinstance(tok, ChatGLM2Tokenizer) and tok.special == special
    assert tok.token_id("<|observation|>") == 408 and tok.decode([401, 403]) == "[gMASK]sop"
    plain = _checkpoint(tmp_path / "plain", {"tokenizer": "tokenizer.model", "tokenizer_offset": 0},
                        glm2_tokenizer_file)
    assert type(load_tokenizer_for(plain, special, plain / "tokenizer.model")) is GLMTokenizer  # GLM-130B's
    assert isinstance(load_tokenizer_for(plain, special, None), IdsOnlyTokenizer)


@pytest.mark.parametrize("name,kind", [("tokenizer.model", "tiktoken"), ("tokenizer.json", "tokenizers"),
                                       ("tokenizer.json", None)])
def test_glm4_metadata_gives_its_bpe(tmp_path, glm4_files, name, kind):
    pytest.importorskip("tiktoken", reason="the glm4 extra (tiktoken) is not installed")
    n = load_tokenizer(glm4_files / name).text_vocab_size
    specials = {s: n + k for k, s in enumerate(GLM4_SPECIALS)}
    meta = {"tokenizer": name, "tokenizer_specials": specials, **({"tokenizer_kind": kind} if kind else {})}
    root = _checkpoint(tmp_path / "glm4", meta, glm4_files / name)
    tok = load_tokenizer_for(root, PRESETS["tiny"].special, find_model_file(root / name))
    assert isinstance(tok, BPETokenizer) and tok.names == {i: s for s, i in specials.items()}
    assert tok.decode(tok.encode("你好 😀")) == "你好 😀"


def test_a_wrong_kind_or_offset_is_one_line(tmp_path, glm2_tokenizer_file):
    root = _checkpoint(tmp_path / "bad", {"tokenizer": "tokenizer.model", "tokenizer_kind": "wordpiece"},
                       glm2_tokenizer_file)
    for meta, match in (({"tokenizer_kind": "wordpiece"}, "unknown tokenizer_kind 'wordpiece'"),
                        ({"tokenizer_kind": "tiktoken"}, "not a tiktoken ranks file"),
                        ({"tokenizer_specials": {"[MASK]": 400}, "tokenizer_offset": 20000}, "text ids begin at 0")):
        (root / "glm_tp.json").write_text(json.dumps({"tokenizer": "tokenizer.model", **meta}))
        with pytest.raises(TokenizerError, match=match) as e:
            load_tokenizer_for(root, PRESETS["tiny"].special, root / "tokenizer.model")
        assert "\n" not in str(e.value)
