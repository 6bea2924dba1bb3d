"""What every tokenizer gives its callers (the engine, prompts, chat formats, streaming), and its errors.

A tokenizer has text ids `offset .. offset + text_vocab_size - 1` (the ids a model may generate, with its
end tokens), the model's control ids (`special`), and named special tokens appended after the text
vocabulary (`names`: id -> name, decoded as their names; `token_id` reads them by name). Text given to
`encode` is always plain text: a user typing "<|user|>" or "[gMASK]" gets text tokens, never the control id.
"""
from __future__ import annotations

from glm_tp.config import SpecialTokens

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


def appended_specials(names: tuple[str, ...], first: int, given: dict[str, int] | None) -> dict[int, str]:
    """id -> name of the special tokens after the text vocabulary: the checkpoint's ids where its metadata
    gives them ("tokenizer_specials"), else `names` in order from `first`, the layout the models use."""
    if given:
        return {int(i): str(n) for n, i in given.items()}
    return {first + k: n for k, n in enumerate(names)}
