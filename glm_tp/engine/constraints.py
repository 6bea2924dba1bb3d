"""What a fill may generate next: per-request constraints on the tokens (structured output, forced tool calls).

A `Constraint` follows one fill's tokens on rank 0. Before each choice the sampler asks it for the allowed
ids (`mask`) of that request's row only, so rows without one pay nothing; after the choice the job tells it
the token (`advance`). End tokens (eos, eop, the model's stop ids) are the job's: a constraint says whether
the fill may end now (`can_end`), and the job allows its end tokens then.

`Grammar` describes what a fill must look like, independent of the grammar library that enforces it: a JSON
value (under a schema, or any JSON object), a regular expression, a literal text, or a sequence or a choice of
those (a tool call: the function's name, a newline, then its arguments under the function's schema).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

import torch


class ConstraintError(ValueError):
    """A constraint that cannot be built (an invalid schema or regex) or a token it does not allow."""


class Constraint(Protocol):
    def mask(self) -> torch.Tensor | None:
        """Bool [vocab_size] (or longer), True for the ids allowed next; None: no constraint at this step."""

    def advance(self, token: int) -> None:
        """The fill's next token (never an end token); raises ConstraintError if it was not allowed."""

    def can_end(self) -> bool:
        """Whether the fill may end here (the text so far is complete)."""

    def finished(self) -> bool:
        """Whether nothing but the end may follow (the fill ends at once)."""


ConstraintFactory = Callable[[], Constraint]  # a fresh constraint for each fill


@dataclass(frozen=True)
class JsonValue:
    """A JSON value under `schema` (a JSON Schema object); None: any JSON object."""

    schema: dict | None = None


@dataclass(frozen=True)
class Regex:
    pattern: str


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class Sequence:
    parts: tuple["Grammar", ...]


@dataclass(frozen=True)
class OneOf:
    options: tuple["Grammar", ...]


Grammar = Union[JsonValue, Regex, Literal, Sequence, OneOf]
