"""What every tokenizer gives its callers (the engine, prompts, chat formats, streaming), and its errors.

A tokenizer has text ids `offset .. offset + text_vocab_size - 1` (the ids a model may generate, with its
end tokens), the model's control ids (`special`), and named special tokens appended after the text
vocabulary (`names`: id -> name, decoded as their names; `token_id` reads them by name). Text given to
`encode` is always plain text: a user typing "<|user|>" or "[gMASK]" gets text tokens, never the control id.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from glm_tp.config import SpecialTokens

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor

REPLACEMENT = "\ufffd"  # what ids that end inside a multi-byte character decode to


class TokenizerError(FileNotFoundError):
    """A missing or unreadable tokenizer model (or a missing library), in one line that names it."""


class BaseTokenizer:
    special: SpecialTokens
    offset: int
    names: dict[int, str]

    @property
    def text_vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_id(self, name: str) -> int | None:
        """The id of the special token `name` ("<|user|>", "[gMASK]"), None when this tokenizer has none."""
        for i, n in self.names.items():
            if n == name:
                return i
        return None

    def is_text(self, i: int) -> bool:
        return 0 <= i - self.offset < self.text_vocab_size

    def token_bytes(self, vocab_size: int) -> list[bytes | None]:
        """Each id's bytes in [0, vocab_size), for a grammar over the vocabulary; None for an id that is not
        text (a control or special token, an image id below the offset, a padded embedding row)."""
        return [self.piece_bytes(i - self.offset) if self.is_text(i) and i not in self.names else None
                for i in range(vocab_size)]

    def piece_bytes(self, piece: int) -> bytes | None:
        """The bytes of text piece `piece` (an id less the offset); None when it is no text."""
        raise NotImplementedError


def sentencepiece_bytes(sp: SentencePieceProcessor, piece: int) -> bytes | None:
    """A sentencepiece piece's bytes as its decoder writes them: the word boundary U+2581 is a space, a byte
    fallback piece <0xNN> its byte; control, unknown and unused pieces are no text. (A decoded text drops
    a leading word boundary, so an answer's text may lack the grammar's first space.)"""
    if sp.is_control(piece) or sp.is_unknown(piece) or sp.is_unused(piece):
        return None
    text = sp.id_to_piece(piece)
    if sp.is_byte(piece):
        return bytes([int(text[3:5], 16)])
    return text.replace("\u2581", " ").encode("utf-8")


def appended_specials(names: tuple[str, ...], first: int, given: dict[str, int] | None) -> dict[int, str]:
    """id -> name of the special tokens after the text vocabulary: the checkpoint's ids where its metadata
    gives them ("tokenizer_specials"), else `names` in order from `first`, the layout the models use."""
    if given:
        return {int(i): str(n) for n, i in given.items()}
    return {first + k: n for k, n in enumerate(names)}


def special_from_names(names: dict[int, str], sop: str, eop: str, eos: int | str, pad: int | str) -> SpecialTokens:
    """The model's control ids as the tokenizer names them (sop/eop: their names; eos/pad: an id or a name),
    for a tokenizer loaded without the model's."""
    ids = {n: i for i, n in names.items()}
    wanted = ["[MASK]", "[gMASK]", "[sMASK]", sop, eop] + [x for x in (eos, pad) if isinstance(x, str)]
    missing = [n for n in wanted if n not in ids]
    if missing:
        raise TokenizerError(f"the tokenizer's special tokens lack {', '.join(missing)}: the checkpoint metadata's "
                             f"tokenizer_specials should name them")
    return SpecialTokens(mask=ids["[MASK]"], gmask=ids["[gMASK]"], smask=ids["[sMASK]"], sop=ids[sop], eop=ids[eop],
                         eos=ids.get(eos, eos), pad=ids.get(pad, pad))
