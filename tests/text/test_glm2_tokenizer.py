"""ChatGLM2/3's tokenizer: sentencepiece as the model's own code uses it, the special tokens after its pieces."""
from __future__ import annotations

import pytest
import sentencepiece as spm

from glm_tp.config import CHATGLM2_SPECIALS, CHATGLM3_ROLES
from glm_tp.text.base import TokenizerError
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from glm_tp.text.tokenizer import GLMTokenizer, load_tokenizer

TEXTS = ["你好，世界！", "hello  world\n\nnew line", "  indented\ttab 😀🎉", "罕见字龘 and [Round 1]"]


def _glm3_specials(pieces: int) -> dict[str, int]:
    return {n: pieces + k for k, n in enumerate(CHATGLM2_SPECIALS + CHATGLM3_ROLES)}


def test_text_is_encoded_as_sentencepiece_does_and_reads_back(glm2_tokenizer_file):
    sp = spm.SentencePieceProcessor(model_file=str(glm2_tokenizer_file))
    tok = load_tokenizer(glm2_tokenizer_file, specials=_glm3_specials(sp.get_piece_size()))
    assert isinstance(tok, ChatGLM2Tokenizer) and tok.offset == 0 and tok.text_vocab_size == sp.get_piece_size()
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)  # newlines are byte pieces, not GLM-130B's <n>
        assert tok.decode(tok.encode(text)) == text
    assert sp.piece_to_id("<0x0A>") in tok.encode("a\nb")


def test_special_tokens_follow_the_pieces_and_decode_to_their_names(glm2_tokenizer_file):
    pieces = spm.SentencePieceProcessor(model_file=str(glm2_tokenizer_file)).get_piece_size()
    glm2 = ChatGLM2Tokenizer(glm2_tokenizer_file)  # no metadata: ChatGLM2's five after the pieces
    assert glm2.special.mask == pieces and glm2.special.gmask == pieces + 1 and glm2.special.sop == pieces + 3
    assert glm2.token_id("<|user|>") is None
    glm3 = ChatGLM2Tokenizer(glm2_tokenizer_file, specials=_glm3_specials(pieces))
    user, assistant = glm3.token_id("<|user|>"), glm3.token_id("<|assistant|>")
    assert (user, assistant) == (pieces + 6, pieces + 7)
    ids = [glm3.special.gmask, glm3.special.sop, user] + glm3.encode("\n") + glm3.encode("你好") + [assistant]
    # a run's word boundary after the newline reads as a space: ChatGLM3's template writes it "\n "
    assert glm3.decode(ids) == "[gMASK]sop<|user|>\n 你好<|assistant|>"
    ids = glm3.encode("hi there")
    assert glm3.decode(ids[:1] + [pieces + 40] + ids[1:]) == "hi there"  # a padded embedding row: no text


def test_typed_special_tokens_are_plain_text(glm2_tokenizer_file):
    pieces = spm.SentencePieceProcessor(model_file=str(glm2_tokenizer_file)).get_piece_size()
    tok = ChatGLM2Tokenizer(glm2_tokenizer_file, specials=_glm3_specials(pieces))
    typed = "<|user|> [gMASK] sop <|assistant|>"
    ids = tok.encode(typed)
    assert all(i < pieces for i in ids) and tok.decode(ids) == typed


def test_without_specials_a_sentencepiece_model_is_still_glm130b_s(glm2_tokenizer_file):
    tok = load_tokenizer(glm2_tokenizer_file)
    assert type(tok) is GLMTokenizer


def test_specials_without_the_control_tokens_are_one_line(glm2_tokenizer_file):
    with pytest.raises(TokenizerError, match="lack \\[sMASK\\], sop, eop: the checkpoint metadata's tokenizer_specials"):
        load_tokenizer(glm2_tokenizer_file, specials={"[MASK]": 400, "[gMASK]": 401})
