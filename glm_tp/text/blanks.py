"""GLM's blank infilling: from prompt text to the tokens, positions and attention of each fill.

The rules are the reference's (GLM-130B generate.py):
- the blank kind filled is [MASK] if the prompt has one, else [sMASK], else [gMASK]; masks of other
  kinds stay in the context as plain tokens;
- a prompt without any mask gets [gMASK] appended; a prompt that does not end with a mask gets eos;
- every blank is filled in its own pass, left to right: context = the prompt so far (earlier blanks
  already filled in), then sop; the context without sop is bidirectional, sop and the generated
  tokens causal;
- positions count 0..n-1 over the context; from sop on they stay pinned at the mask's index for
  [MASK]/[sMASK] and keep counting for [gMASK].
- 2D positions (ChatGLM-6B, `position_encoding="2d"`): each position is a pair (position, block position).
  The context is (0, 0) .. (n-1, 0); from sop on the position stays at the mask's index for every mask kind
  and the block position counts 1, 2, ...
- Causal models (ChatGLM2/3, GLM-4: `ModelConfig.causal`) have no blanks: a text prompt is [gMASK] sop and
  the text's ids (as their own code builds it), attention causal over the whole sequence, positions
  0..n-1, and the one answer continues from position n. Ids given by the caller are used verbatim. It is
  still one fill (`causal_fill`), so the engine runs both kinds the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from glm_tp.config import SpecialTokens
from glm_tp.text.tokenizer import GLMTokenizer

MASK_PATTERN = re.compile(r"\[(MASK|sMASK|gMASK)\]")


CONTEXT_LENGTH = "context_length_exceeded"   # prompt and answer do not fit the model's max length
INVALID_PROMPT = "invalid_prompt"            # anything else that keeps a request from ever running


class PromptError(ValueError):
    """A prompt that cannot be run, with what to change; `code` says which kind of problem it is."""

    def __init__(self, message: str, code: str = INVALID_PROMPT):
        super().__init__(message)
        self.code = code


def mask_ids(special: SpecialTokens) -> dict[str, int]:
    return {"MASK": special.mask, "sMASK": special.smask, "gMASK": special.gmask}


def tokenize_prompt(text: str, tok: GLMTokenizer) -> list[int]:
    """Prompt text to context ids: mask markers become their ids, then `complete_context`."""
    ids: list[int] = []
    marks = mask_ids(tok.special)
    pos = 0
    for m in MASK_PATTERN.finditer(text):
        ids.extend(tok.encode(text[pos:m.start()]))
        ids.append(marks[m.group(1)])
        pos = m.end()
    ids.extend(tok.encode(text[pos:]))
    return complete_context(ids, tok.special)


def complete_context(ids: list[int], special: SpecialTokens) -> list[int]:
    """Add [gMASK] when there is no mask and eos when the context does not end with a mask."""
    masks = set(mask_ids(special).values())
    ids = list(ids)
    if not masks.intersection(ids):
        ids.append(special.gmask)
    if ids[-1] not in masks:
        ids.append(special.eos)
    return ids


def fill_kind(ids: list[int], special: SpecialTokens) -> int:
    """The mask id this prompt's blanks are filled for."""
    for kind in (special.mask, special.smask):
        if kind in ids:
            return kind
    return special.gmask


Position = Union[int, tuple[int, int]]


@dataclass
class BlankInput:
    """One fill pass: the model input up to and including sop, and how generation continues.

    Positions are ints (1D) or (position, block position) pairs (2D). Generated token g (0-based) sits at
    `next_position + counting * g`, per dimension: `counting` is 1 where positions count on, 0 where pinned."""

    tokens: list[int]          # context + [sop]
    positions: list[Position]  # same length as tokens
    bidirectional: int         # context tokens every query sees (all but sop)
    mask_index: int            # where the blank is in the context
    next_position: Position    # position of the first generated token
    counting: Position         # 1D: 0 pinned ([MASK]/[sMASK]) or 1 ([gMASK]); 2D: (0, 1)
    causal: bool = False       # a causal model's continuation: the answer goes after the whole context

    def position_after(self, generated: int) -> Position:
        """Position of generated token number `generated` (0-based)."""
        if isinstance(self.next_position, tuple):
            return tuple(p + c * generated for p, c in zip(self.next_position, self.counting))
        return self.next_position + self.counting * generated


def next_blank(ids: list[int], kind: int, special: SpecialTokens, position_encoding: str = "1d") -> BlankInput | None:
    if kind not in ids:
        return None
    m = ids.index(kind)
    n = len(ids)
    if position_encoding == "2d":  # position pinned at the mask for every kind, block position counts from 1
        return BlankInput(tokens=ids + [special.sop], positions=[(i, 0) for i in range(n)] + [(m, 1)],
                          bidirectional=n, mask_index=m, next_position=(m, 2), counting=(0, 1))
    pinned = kind != special.gmask
    sop_position = m if pinned else n
    return BlankInput(tokens=ids + [special.sop], positions=list(range(n)) + [sop_position], bidirectional=n,
                      mask_index=m, next_position=m if pinned else n + 1, counting=0 if pinned else 1)


def causal_prompt(text: str, tok: GLMTokenizer) -> list[int]:
    """A causal model's prompt: [gMASK] sop, then the text as plain text. A mask marker in it is refused:
    such a model was not trained to fill blanks, and guessing what was meant would answer something else."""
    marker = MASK_PATTERN.search(text)
    if marker:
        raise PromptError(f"this model has no blank infilling, so {marker.group()} cannot be filled: send the "
                          f"text to continue, without [MASK], [sMASK] or [gMASK]")
    return [tok.special.gmask, tok.special.sop] + tok.encode(text)


def causal_fill(ids: list[int]) -> BlankInput:
    """The one fill of a causal model: the context as it is, causal throughout, positions counting on."""
    n = len(ids)
    return BlankInput(tokens=list(ids), positions=list(range(n)), bidirectional=0, mask_index=n,
                      next_position=n, counting=1, causal=True)


def shown_ids(ids: list[int], special: SpecialTokens, causal: bool) -> list[int]:
    """The ids a causal model's text is read from: without the [gMASK] sop prefix every prompt begins with
    (the model's, not the user's text); other models' ids as they are."""
    return ids[2:] if causal and ids[:2] == [special.gmask, special.sop] else ids


def splice(ids: list[int], mask_index: int, generated: list[int]) -> list[int]:
    """Put a blank's answer where its mask was."""
    return ids[:mask_index] + list(generated) + ids[mask_index + 1:]


def check_length(ids: list[int], max_len: int, causal: bool = False) -> None:
    """A prompt must fit the model: with the sop a blank fill adds, a causal prompt as it is."""
    size, what = (len(ids), "tokens") if causal else (len(ids) + 1, "tokens with sop")
    if size > max_len:
        raise PromptError(f"prompt is {size} {what}, more than the model's max length {max_len}: shorten it",
                          CONTEXT_LENGTH)


LEAD_CONTEXT = 8  # prompt tokens before a blank decoded with its answer, to read the answer in context


def answer_lead(tok: GLMTokenizer, before: list[int], answer: list[int]) -> str:
    """What the answer's text gains in context: decoded alone, a first word piece loses the space it
    carries after the tokens `before` it (the prompt's, up to the blank)."""
    text_ids = []
    for t in reversed(before[-LEAD_CONTEXT:]):  # the text tokens right before the blank
        if not 0 <= t - tok.offset < tok.text_vocab_size:
            break
        text_ids.insert(0, t)
    if not text_ids or not answer:
        return ""
    head, alone = tok.decode(text_ids), tok.decode(answer)
    whole = tok.decode(text_ids + answer)
    if not whole.startswith(head) or not whole.endswith(alone):
        return ""
    lead = whole[len(head):len(whole) - len(alone)]
    return lead if not lead.strip() else ""


def join_answer(before: str, answer: str) -> str:
    """Text followed by an answer read in context: a space already at the end of the text is not doubled."""
    return before + answer[1:] if before[-1:].isspace() and answer[:1] == " " else before + answer


def filled_text(prompt: str, kind: int, special: SpecialTokens, answers: list[str]) -> str:
    """The prompt as the user gave it with the blanks of `kind` filled by `answers` (each read in context,
    see answer_lead), in order; a prompt without a mask continues with its first answer. The user's text is
    kept exactly (no re-decoding): a space already before a blank is not doubled."""
    pieces = MASK_PATTERN.split(prompt)  # text, kind, text, kind, ..., text
    names = {v: k for k, v in mask_ids(special).items()}
    if len(pieces) == 1:
        return join_answer(prompt, answers[0]) if answers else prompt
    out, left = pieces[0], list(answers)
    for name, text in zip(pieces[1::2], pieces[2::2]):
        out = join_answer(out, left.pop(0)) if name == names[kind] and left else out + f"[{name}]"
        out += text
    return out
