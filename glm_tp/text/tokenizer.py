"""The GLM-130B tokenizer, read with sentencepiece alone (no icetk, which drags in a CUDA torch).

icetk's text ids are the ids of its sentencepiece model `ice_text.model` plus 20000 (the image
tokens come first); GLM's control tokens sit above the text vocabulary (`SpecialTokens`). Small
models use any sentencepiece model, usually with offset 0, and declare their special ids in the
checkpoint metadata. Newlines are kept: they map to the `<n>` piece when the model has one.
ChatGLM-6B's tokenizer (`whitespace=True`) also writes a tab as `<|tab|>` and a run of 2-80 spaces as
`<|blank_N|>`, and reads them back.

`load_tokenizer` picks the tokenizer a checkpoint's files and metadata describe: this one, ChatGLM2/3's
(text/chatglm2_tokenizer.py: a sentencepiece model with its special tokens appended) or GLM-4's byte-level
BPE (text/bpe.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import sentencepiece as spm

from glm_tp.config import SpecialTokens
from glm_tp.text import bpe
from glm_tp.text.base import REPLACEMENT, BaseTokenizer, TokenizerError, sentencepiece_bytes
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from glm_tp.text.unicode import check_text

__all__ = ["REPLACEMENT", "GLMTokenizer", "IdsOnlyTokenizer", "TokenizerError", "find_model_file", "load_tokenizer"]

ICETK_TEXT_OFFSET = 20000
NEWLINE_PIECE = "<n>"
# where a folder keeps its tokenizer: icetk's (GLM-130B, ChatGLM-6B), sentencepiece's or tiktoken's
# tokenizer.model (ChatGLM2/3, GLM-4), the tokenizers library's tokenizer.json (glm-4-9b-chat-hf)
MODEL_FILES = ("ice_text.model", "tokenizer.model", "tokenizer.json")
SPACE_RUN = re.compile(r" {2,80}")
KINDS = ("sentencepiece", "tiktoken", "tokenizers")


class GLMTokenizer(BaseTokenizer):
    def __init__(self, model_file: str | os.PathLike, special: SpecialTokens | None = None,
                 text_offset: int = ICETK_TEXT_OFFSET, whitespace: bool = False):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.whitespace = whitespace
        # pieces that stand for whitespace (ChatGLM-6B): sentencepiece id -> text
        self.spaces = {i: ("\t" if p == "<|tab|>" else " " * int(p[8:-2])) for i in range(self.sp.get_piece_size())
                       if (p := self.sp.id_to_piece(i)) == "<|tab|>" or re.fullmatch(r"<\|blank_\d+\|>", p)} \
            if whitespace else {}
        self.special = special or SpecialTokens()
        self.offset = text_offset
        newline = self.sp.piece_to_id(NEWLINE_PIECE)
        self.newline_id = newline if newline != self.sp.unk_id() else None
        self.names = {self.special.mask: "[MASK]", self.special.gmask: "[gMASK]", self.special.smask: "[sMASK]",
                      self.special.sop: "<sop>", self.special.eop: "<eop>", self.special.eos: "</s>"}

    @property
    def text_vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; mask markers are NOT parsed here (see blanks.tokenize_prompt).

        Newlines become the `<n>` piece, as icetk's line-break mode does (the text is encoded in one
        piece with `<n>` in place of each newline); a model without `<n>` reads them as spaces."""
        if not text:
            return []
        check_text(text, "text")  # sentencepiece would fail on a lone surrogate with a RuntimeError
        text = text.replace("\n", NEWLINE_PIECE if self.newline_id is not None else " ")
        if self.whitespace:
            text = SPACE_RUN.sub(lambda m: f"<|blank_{len(m.group())}|>", text.replace("\t", "<|tab|>"))
        return [t + self.offset for t in self.sp.encode(text)]

    def decode(self, ids: list[int]) -> str:
        """Text ids back to text; control tokens render as their names, padded rows as nothing."""
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                # sentencepiece drops a run's leading word boundary; keep it after earlier text
                space = " " if out and out[-1] != "\n" and self.sp.id_to_piece(run[0]).startswith("\u2581") else ""
                out.append(space + self.sp.decode(run))
                run.clear()

        for i in ids:
            if i in self.names:
                flush()
                out.append(self.names[i])
            elif self.newline_id is not None and i - self.offset == self.newline_id:
                flush()
                out.append("\n")
            elif i - self.offset in self.spaces:
                flush()
                out.append(self.spaces[i - self.offset])
            elif 0 <= i - self.offset < self.text_vocab_size:
                run.append(i - self.offset)
        flush()
        return "".join(out)

    def piece_bytes(self, piece: int) -> bytes | None:
        if piece == self.newline_id:
            return b"\n"
        if piece in self.spaces:
            return self.spaces[piece].encode()
        return sentencepiece_bytes(self.sp, piece)


class IdsOnlyTokenizer(GLMTokenizer):
    """The stand-in for a job of token ids run without a tokenizer: it reads no text and writes none (results'
    text fields are empty, their token ids are the answer), and the model may generate every id below its
    control tokens, since which ids are text is unknown."""

    def __init__(self, special: SpecialTokens):  # no sentencepiece model to load
        self.special, self.offset, self.whitespace = special, 0, False
        self.spaces: dict[int, str] = {}
        self.newline_id, self.names = None, {}
        self._text_ids = min(special.mask, special.gmask, special.smask, special.sop, special.eop)

    @property
    def text_vocab_size(self) -> int:
        return self._text_ids

    def encode(self, text: str) -> list[int]:
        raise ValueError("this run has no tokenizer, so prompts must be token ids: point tokenizer= at a "
                         "sentencepiece model for text")

    def decode(self, ids: list[int]) -> str:
        return ""

    def piece_bytes(self, piece: int) -> bytes | None:
        return None  # no text is known


def find_model_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    candidates = [p / name for name in MODEL_FILES] if p.is_dir() or not p.suffix else [p]
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise TokenizerError(f"no tokenizer model found (looked for {looked}): put the model's tokenizer file "
                         f"({', '.join(MODEL_FILES)}) there or point tokenizer= at the folder or file that holds it")


def tokenizer_kind(model_file: Path, kind: str | None) -> str:
    """The metadata's "tokenizer_kind", else what the file is: a tokenizer.json, tiktoken's text ranks or a
    sentencepiece model."""
    if kind:
        if kind not in KINDS:
            raise TokenizerError(f"unknown tokenizer_kind {kind!r}: use one of {', '.join(KINDS)}")
        return kind
    if model_file.suffix == ".json":
        return "tokenizers"
    return "tiktoken" if bpe.looks_like_ranks(model_file) else "sentencepiece"


def load_tokenizer(path: str | os.PathLike, special: SpecialTokens | None = None,
                   text_offset: int | None = None, whitespace: bool = False, kind: str | None = None,
                   specials: dict[str, int] | None = None) -> BaseTokenizer:
    """A folder holding ice_text.model (icetk layout, offset 20000; ChatGLM-6B's: offset 0, whitespace pieces),
    tokenizer.model or tokenizer.json, or one such file. kind and specials are the checkpoint metadata's
    "tokenizer_kind" and "tokenizer_specials": a sentencepiece model with appended specials is ChatGLM2/3's,
    tiktoken ranks or a tokenizer.json GLM-4's byte-level BPE."""
    model_file = find_model_file(path)
    kind = tokenizer_kind(model_file, kind)
    if kind != "sentencepiece" or specials:  # ChatGLM2/3, GLM-4: text ids from 0, specials after them
        if text_offset:
            raise TokenizerError(f"tokenizer_offset {text_offset}: {model_file.name}'s text ids begin at 0")
        if kind == "tiktoken":
            return bpe.load_tiktoken(model_file, special, specials)
        if kind == "tokenizers":
            return bpe.load_hf_tokenizer(model_file, special, specials)
    if text_offset is None:
        text_offset = ICETK_TEXT_OFFSET if model_file.name == "ice_text.model" else 0
    try:
        if specials:
            return ChatGLM2Tokenizer(model_file, special, specials)
        return GLMTokenizer(model_file, special, text_offset, whitespace)
    except TokenizerError:
        raise
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{model_file} is not a readable sentencepiece model ({e}): "
                             f"point tokenizer= at the model's tokenizer file") from None
