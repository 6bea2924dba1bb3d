"""A scripted constraint: a stand-in for a grammar that makes a random-weight model write a fixed text."""
from __future__ import annotations

import torch

from glm_tp.engine.constraints import ConstraintError


class Scripted:
    """Allows exactly the next token of `script` and, once it is all written, the end (as a grammar would);
    with fail_at, its mask raises at that token, as a broken grammar might."""

    def __init__(self, script: list[int], vocab_size: int, fail_at: int | None = None):
        self.script, self.vocab_size, self.at, self.fail_at = script, vocab_size, 0, fail_at

    def mask(self) -> torch.Tensor:
        if self.at == self.fail_at:
            raise RuntimeError("the grammar broke")
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        if self.at < len(self.script):
            allowed[self.script[self.at]] = True
        return allowed

    def advance(self, token: int) -> None:
        if self.at >= len(self.script) or token != self.script[self.at]:
            raise ConstraintError(f"token {token} is not allowed")
        self.at += 1

    def can_end(self) -> bool:
        return self.at == len(self.script)

    def finished(self) -> bool:
        return False  # the end token itself is chosen by the sampler once can_end
