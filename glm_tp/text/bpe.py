"""GLM-4's byte-level BPE tokenizer, from a clone's files: tiktoken ranks in `tokenizer.model` (a line per
token: its bytes in base64, a space, its rank) read with the `tiktoken` library, or a `tokenizer.json` read
with the `tokenizers` library (glm-4-9b-chat-hf). Both are optional: `pip install glm-tp[glm4]`.

Text ids are the BPE ranks 0 .. n-1; the special tokens follow from n (GLM-4: 151329, config.GLM4_SPECIALS).
Encoding is the library's BPE over GLM-4's pre-tokenizer split, with every special token read as plain text.
Decoding joins the ids' bytes and reads them as UTF-8 here (the same for both files): bytes that end inside
a character decode to one U+FFFD at the end, which a stream holds back until the character is complete.
"""
from __future__ import annotations

import base64
import binascii
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from glm_tp.config import GLM4_SPECIALS, SpecialTokens
from glm_tp.text.base import (
    BaseTokenizer,
    TokenizerError,
    appended_specials,
    special_from_names,
)
from glm_tp.text.unicode import check_text

# GLM-4's pre-tokenizer split (its tokenization_chatglm.py): contractions, letter runs with one leading
# non-letter, 1-3 digits, punctuation runs, newlines, spaces
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EXTRA = "glm4"  # setup.py's extra that installs both libraries


def need(module: str) -> object:
    """The optional library `module`, or the one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TokenizerError(f"GLM-4's tokenizer needs the {module} library: pip install 'glm-tp[{EXTRA}]'") from None


class BPETokenizer(BaseTokenizer):
    def __init__(self, pieces: list[bytes], encoder: Callable[[str], list[int]], names: dict[int, str],
                 special: SpecialTokens | None = None):
        """pieces: each text id's bytes; encoder: plain text -> text ids; names: id -> special token name."""
        self.pieces, self._encode, self.names, self.offset = pieces, encoder, names, 0
        self.special = special or special_from_names(names, "<sop>", "<eop>", "<|endoftext|>", "<|endoftext|>")

    @property
    def text_vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._encode(check_text(text, "text"))

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if i in self.names:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(self.names[i])
                run = bytearray()
            elif self.is_text(i):
                run += self.pieces[i]
            # anything else is a padded embedding row: no text
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def piece_bytes(self, piece: int) -> bytes | None:
        return self.pieces[piece]


def read_ranks(path: Path) -> list[bytes]:
    """A tiktoken ranks file as each rank's bytes; ranks must be 0 .. n-1, each once."""
    ranks: dict[int, bytes] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            if line.strip():
                token, rank = line.split()
                ranks[int(rank)] = base64.b64decode(token, validate=True)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path} is not a tiktoken ranks file (line {number}: {e}): point tokenizer= at "
                                 f"GLM-4's tokenizer.model") from None
    if sorted(ranks) != list(range(len(ranks))) or len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: the ranks are not 0 .. {len(ranks) - 1}, each with its own bytes")
    return [ranks[r] for r in range(len(ranks))]


def looks_like_ranks(path: Path) -> bool:
    """Whether a tokenizer.model is tiktoken's text (GLM-4) rather than a sentencepiece protobuf."""
    with open(path, "rb") as f:
        first = f.readline(512).strip().split(b" ")
    try:
        return len(first) == 2 and bool(base64.b64decode(first[0], validate=True)) and first[1].isdigit()
    except binascii.Error:
        return False


def load_tiktoken(path: str | os.PathLike, special: SpecialTokens | None = None,
                  specials: dict[str, int] | None = None) -> BPETokenizer:
    """GLM-4's tokenizer.model (tiktoken ranks)."""
    pieces = read_ranks(Path(path))
    tiktoken = need("tiktoken")
    enc = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, special_tokens={},
                            mergeable_ranks={b: r for r, b in enumerate(pieces)})
    return BPETokenizer(pieces, enc.encode_ordinary, appended_specials(GLM4_SPECIALS, len(pieces), specials), special)


def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's): printable Latin-1 bytes stand for
    themselves, the other bytes for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + k): b for k, b in enumerate(moved)}}


def load_hf_tokenizer(path: str | os.PathLike, special: SpecialTokens | None = None,
                      specials: dict[str, int] | None = None) -> BPETokenizer:
    """A byte-level BPE tokenizer.json (glm-4-9b-chat-hf): its added tokens are the specials, and are left out
    of the encoder so that text never becomes one."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        vocab: dict[str, int] = spec["model"]["vocab"]
        if spec["model"].get("type") != "BPE":
            raise ValueError(f"a {spec['model'].get('type')} model, not BPE")
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{path} is not a BPE tokenizer.json ({e}): point tokenizer= at GLM-4's") from None
    added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []}
    names = appended_specials(GLM4_SPECIALS, len(vocab), specials or added or None)
    alphabet = byte_alphabet()
    pieces: dict[int, bytes] = {}
    for token, i in vocab.items():
        if i not in names:
            if any(c not in alphabet for c in token):
                raise TokenizerError(f"{path}: token {token!r} is not byte-level BPE (GLM-4's tokenizer is)")
            pieces[i] = bytes(alphabet[c] for c in token)
    if sorted(pieces) != list(range(len(pieces))):
        raise TokenizerError(f"{path}: the text token ids are not 0 .. {len(pieces) - 1}")
    tokenizers = need("tokenizers")
    plain = {**spec, "added_tokens": [], "post_processor": None, "truncation": None, "padding": None}  # BPE alone
    encoder = tokenizers.Tokenizer.from_str(json.dumps(plain))
    return BPETokenizer([pieces[i] for i in range(len(pieces))],
                        lambda text: encoder.encode(text, add_special_tokens=False).ids, names, special)
