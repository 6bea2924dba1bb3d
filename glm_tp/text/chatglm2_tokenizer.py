"""ChatGLM2/3's tokenizer: a sentencepiece model (`tokenizer.model`) read as it is, with the special tokens
appended after its pieces ([MASK] [gMASK] [sMASK] sop eop; ChatGLM3 adds its four role tokens).

As the models' own tokenizer does: text goes to sentencepiece unchanged (the model's byte fallback spells
newlines and rare characters as byte pieces; its dummy prefix puts a word boundary before each encoded
text), and a decode reads each run of text ids between special tokens on its own, the special tokens as
their names. The special tokens never come from text: they are not sentencepiece pieces.
"""
from __future__ import annotations

import os

import sentencepiece as spm

from glm_tp.config import CHATGLM2_SPECIALS, SpecialTokens
from glm_tp.text.base import (
    BaseTokenizer,
    appended_specials,
    sentencepiece_bytes,
    special_from_names,
)
from glm_tp.text.unicode import check_text


class ChatGLM2Tokenizer(BaseTokenizer):
    def __init__(self, model_file: str | os.PathLike, special: SpecialTokens | None = None,
                 specials: dict[str, int] | None = None):
        """specials: {name: id} of the appended tokens (the checkpoint's "tokenizer_specials"); without
        them, ChatGLM2's five after the pieces."""
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.offset = 0
        self.names = appended_specials(CHATGLM2_SPECIALS, self.sp.get_piece_size(), specials)
        self.special = special or special_from_names(self.names, "sop", "eop", self.sp.eos_id(),
                                                     max(self.sp.unk_id(), 0))

    @property
    def text_vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        check_text(text, "text")  # sentencepiece would fail on a lone surrogate with a RuntimeError
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.names:
                out.append(self.sp.decode(run))
                out.append(self.names[i])
                run = []
            elif self.is_text(i):
                run.append(i)
            # anything else is a padded embedding row: no text
        out.append(self.sp.decode(run))
        return "".join(out)

    def piece_bytes(self, piece: int) -> bytes | None:
        return sentencepiece_bytes(self.sp, piece)
