"""A growing answer's text, streamed: decoded a few ids at a time, held back where it may still change,
and cut at the first stop string.

With byte-level BPE (GLM-4) and sentencepiece's byte pieces (ChatGLM2/3) one character can take several ids:
until its last byte comes its bytes read as U+FFFD, and that end waits, so a character never shows broken and
the text sent so far is always the start of the final text."""
from __future__ import annotations

from glm_tp.text.base import REPLACEMENT, BaseTokenizer


class TextStream:
    """The text of a growing list of ids, decoded a few ids at a time (streaming decoded the whole list
    at every token: 2 ms per token at 2048 tokens with the demo tokenizer, quadratic in the answer).

    The text is committed at points where it does not end inside a multi-byte character. An update
    decodes the ids from an earlier point (the window) and appends what they add beyond the ids up to
    the last point (the head). That is the whole decode's text when the head reads on its own as it does
    in context: a run's first word boundary or a lone space piece can read differently at the start of a
    decode, and then the point before is tried, and after a few the whole list is decoded."""

    TRIES = 4

    def __init__(self, tok: BaseTokenizer):
        self.tok, self.text = tok, ""
        self.points = [(0, 0)]  # committed points: (ids, characters of the text there); the last is now

    def update(self, ids: list[int]) -> str:
        """The text of `ids`, which extend the ids of the previous call."""
        read = self.points[-1][0]
        text = None
        for start, chars in reversed(self.points[-1 - self.TRIES:-1]):
            head = self.tok.decode(ids[start:read])
            if _same_start(head, self.text[chars:]):
                window = self.tok.decode(ids[start:])
                if window.startswith(head):
                    text = self.text + window[len(head):]
                    break
        if text is None:
            text = self.tok.decode(ids)
        if not text.endswith(REPLACEMENT):
            self.text = text
            self.points = self.points[-self.TRIES:] + [(len(ids), len(text))]
        return text


class StopStream:
    """The text of one answer's ids as they grow, and where the first of `stops` begins in it."""

    def __init__(self, tok: BaseTokenizer, stops: list[str]):
        self.tok, self.stops = tok, list(stops)
        self.text = TextStream(tok)
        self.cut: int | None = None  # where a stop string begins in the text, once one appeared

    def update(self, ids: list[int]) -> tuple[str, int | None]:
        """For `ids` (which extend the previous call's): the text that can no longer change, up to the stop
        string once one appeared, and where that stop string begins (None while none has)."""
        text = self.text.update(ids)
        cut = find_stop(text, self.stops)
        if cut is not None:
            self.cut = cut
            return text[:cut], cut
        # a multi-byte character still being spelled waits (its bytes read as U+FFFD: one in all, or one each
        # with sentencepiece's byte pieces), and so does an end before it that may still become a stop string
        complete = text.rstrip(REPLACEMENT)
        hold = max([prefix_overlap(complete, s) for s in self.stops] + [0])
        return complete[:len(complete) - hold], None

    def trim(self, ids: list[int], cut: int) -> tuple[list[int], str]:
        """The leading ids whose text lies before character `cut`, and the text up to `cut`."""
        text = self.tok.decode(ids)[:cut]
        keep = len(ids)
        while keep and not text.startswith(self.tok.decode(ids[:keep])):
            keep -= 1
        return ids[:keep], text


def _same_start(head: str, committed: str) -> bool:
    """Whether `head` (ids decoded from a point) reads as the text committed there: the same, or (sentencepiece)
    without the one word-boundary space a decode drops at its start. A decode drops the spaces it starts with
    up to the first other character: when the head has one, the ids after it read as they do in context."""
    return head == committed or (committed[:1] == " " and head == committed[1:] and not head.isspace() and head != "")


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of `stops` to appear begins in `text` (None when none does)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (that text may still become the stop string)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
