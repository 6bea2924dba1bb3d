"""What one iteration does, as rank 0 decides it and every rank applies it, and how it travels.

A `StepPlan` goes out as one fixed-size tensor (command, row counts, beam parents, next tokens); packing
moves, admissions and prefix-cache saves, when there are any, follow as one object broadcast.

Commands in the tensor's first slot: STEP (apply the plan), IDLE (keep-alive while rank 0 waits for
work: a lost rank still fails the collective), END (an `Engine.generate` call is over) and SHUTDOWN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from glm_tp.text.blanks import Position

if TYPE_CHECKING:
    from glm_tp.engine.jobs import Job

STEP, IDLE, END, SHUTDOWN = 0, 1, 2, 3
HEADER = 4  # cmd, rows before the step, rows kept, whether an object follows


@dataclass
class Admission:
    """A fill every rank prefills into `row`, then copies into `copies_to` (the other beams).

    With a cached prefix the row's first `start` slots come from the prefix cache's `blocks` and `tokens`,
    `positions` are the rest of the prompt; `saves` (block number in the row, pool block) go to the cache
    after the prefill (prefix_cache.py)."""

    tokens: list[int]
    positions: list[Position]
    bidirectional: int
    first_position: Position  # an int, or a (position, block position) pair for 2D positions
    counting: Position
    row: int
    copies_to: list[int] = field(default_factory=list)
    start: int = 0
    blocks: list[int] = field(default_factory=list)
    saves: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StepPlan:
    parents: list[int] = field(default_factory=list)           # rows [0, n_old): beam parents (else i)
    moves: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) packing moves, after parents
    tokens: list[int] = field(default_factory=list)            # next token of the kept rows [0, n_keep)
    admit: list[Admission] = field(default_factory=list)
    # rows of ended fills whose blocks go to the prefix cache first: (row, [(block number, pool block)])
    saves: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)

    @property
    def has_extra(self) -> bool:
        """Whether moves, admissions or saves follow the tensor as an object."""
        return bool(self.moves or self.admit or self.saves)


def message_size(max_rows: int) -> int:
    return HEADER + 2 * max_rows


def encode_plan(command: int, plan: StepPlan | None, max_rows: int) -> torch.Tensor:
    """The fixed-size tensor of a command and its plan's parents and tokens."""
    message = torch.zeros(message_size(max_rows), dtype=torch.long)
    message[0] = command
    if plan is not None:
        message[1:4] = torch.tensor([len(plan.parents), len(plan.tokens), int(plan.has_extra)])
        message[HEADER:HEADER + len(plan.parents)] = torch.tensor(plan.parents, dtype=torch.long)
        message[HEADER + max_rows:HEADER + max_rows + len(plan.tokens)] = torch.tensor(plan.tokens, dtype=torch.long)
    return message


def decode_plan(message: torch.Tensor, max_rows: int) -> tuple[StepPlan, bool]:
    """A STEP message's plan (without moves and admissions) and whether they follow as an object."""
    n_old, n_keep, extra = (int(v) for v in message[1:4])
    plan = StepPlan(parents=message[HEADER:HEADER + n_old].tolist(),
                    tokens=message[HEADER + max_rows:HEADER + max_rows + n_keep].tolist())
    return plan, bool(extra)


@dataclass
class Choice:
    """The sampler's answer to one step's logits, which the scheduler turns into a plan."""

    tokens: dict[int, int] = field(default_factory=dict)   # row -> its next token (rows that go on)
    parents: dict[int, int] = field(default_factory=dict)  # beam row -> the row it continues
    ended: list[tuple[Job, str]] = field(default_factory=list)  # fills that ended, and why
