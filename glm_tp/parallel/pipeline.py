"""Pipeline parallelism's two rules: which layers each stage holds, and which rank is which (stage, TP rank).

Ranks = TP x PP, stage-major: rank r is TP rank `r % tp` of stage `r // tp`. torchrun gives each node a
contiguous block of ranks (`--nproc_per_node`), so with `nproc_per_node = tp` a stage is one node: the
all-reduces of tensor parallelism stay on the node's fast links and only one activation per step crosses
the network, from TP rank i of a stage to TP rank i of the next (every TP rank of a stage holds the whole
hidden state after the row-parallel all-reduce, so each sends its own copy and no gather is needed).

The first stage holds the embedding, the last the final norm and the LM head; the layers are contiguous and
may be split unevenly (`StageSplit.balanced` gives the end stages fewer layers for their extra weights).
Point-to-point transfers run on the world group, whose timeout applies to a send or a receive as to a
collective, so a lost stage ends its peers with one line instead of a hang. With several micro-batches in
flight (engine/lanes.py) sends do not block: an `Outbox` keeps each one's work handle and tensor until it is
waited on, within the same timeout.
"""
from __future__ import annotations

import datetime
import re
import weakref
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from glm_tp.parallel.dist import TPContext


@dataclass(frozen=True)
class StageSplit:
    """Stage s holds layers [bounds[s], bounds[s + 1]): contiguous, in order, at least one each."""

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or any(hi <= lo for lo, hi in zip(b, b[1:])):
            raise ValueError(f"stage bounds {list(b)} must start at 0 and give every stage at least one layer")

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    def layers(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def sizes(self) -> list[int]:
        return [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]

    @classmethod
    def even(cls, num_layers: int, stages: int) -> "StageSplit":
        """As even as the layers allow; the first stages take the remainder."""
        check_stages(num_layers, stages)
        return cls.from_sizes([num_layers // stages + (s < num_layers % stages) for s in range(stages)],
                              num_layers, stages)

    @classmethod
    def balanced(cls, num_layers: int, stages: int, layer_bytes: float, first_extra: float,
                 last_extra: float) -> "StageSplit":
        """The split whose largest stage (its layers' bytes, plus the embedding on the first stage and the
        final norm and head on the last) is smallest: the memory planner's. Middle stages are even."""
        check_stages(num_layers, stages)
        if stages == 1:
            return cls((0, num_layers))
        inner = stages - 2
        best: tuple[float, list[int]] | None = None
        for first in range(1, num_layers):
            for last in range(1, num_layers - first + 1):
                middle = num_layers - first - last
                if middle < inner or (inner == 0 and middle):
                    continue
                sizes = [first] + [middle // inner + (s < middle % inner) for s in range(inner)] + [last]
                peak = max(first * layer_bytes + first_extra, last * layer_bytes + last_extra,
                           max(sizes[1:-1], default=0) * layer_bytes)
                if best is None or peak < best[0]:
                    best = (peak, sizes)
        assert best is not None
        return cls.from_sizes(best[1], num_layers, stages)

    @classmethod
    def from_sizes(cls, sizes: list[int], num_layers: int, stages: int) -> "StageSplit":
        check_stages(num_layers, stages)
        if len(sizes) != stages or sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(f"stage_layers {sizes} must be one whole number >= 1 per pipeline stage "
                             f"(pipeline_parallel={stages}), adding up to the model's {num_layers} layers")
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        return cls(tuple(bounds))


def check_stages(num_layers: int, stages: int) -> None:
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= num_layers:
        raise ValueError(f"pipeline_parallel must be a whole number between 1 and the model's {num_layers} "
                         f"layers, not {stages!r}")


@dataclass(frozen=True)
class RankLayout:
    """World ranks as (stage, TP rank), stage-major."""

    tp: int
    pp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp

    def stage_of(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tp

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.tp, (stage + 1) * self.tp))

    def peer(self, rank: int, stage: int) -> int:
        """The rank of `stage` with the same TP rank as `rank`: where its activations go or come from."""
        return stage * self.tp + self.tp_rank_of(rank)

    @classmethod
    def of_world(cls, world: int, pp: int) -> "RankLayout":
        if pp < 1 or world % pp:
            raise ValueError(f"{world} ranks cannot form {pp} pipeline stages: the ranks must be "
                             f"tensor_parallel x pipeline_parallel")
        return cls(world // pp, pp)


_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Stage:
    """This rank's place in the pipeline: its stage of `split`, and the world ranks it trades activations with."""

    split: StageSplit
    index: int
    rank: int          # world rank
    layout: RankLayout

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.split.stages - 1

    @property
    def layers(self) -> range:
        return self.split.layers(self.index)

    @property
    def previous(self) -> int:
        return self.layout.peer(self.rank, self.index - 1)

    @property
    def next(self) -> int:
        return self.layout.peer(self.rank, self.index + 1)

    @property
    def last_stage_lead(self) -> int:
        """The last stage's TP rank 0, which sends the logits to world rank 0."""
        return self.layout.stage_ranks(self.split.stages - 1)[0]

    def holds(self, name: str, tied_head: bool) -> bool:
        """Whether this stage holds the tensor of glm-tp's name `name`: its layers; the embedding on the first
        stage (and the last, when the LM head is the embedding); the final norm and the LM head on the last."""
        layer = _LAYER.match(name)
        if layer:
            return int(layer.group(1)) in self.layers
        if name.startswith("transformer.word_embeddings."):
            return self.is_first or (tied_head and self.is_last)
        if name.startswith(("transformer.final_layernorm.", "lm_head.")):
            return self.is_last
        return True


def init_pipeline(world: TPContext, pp: int, split: StageSplit) -> tuple[TPContext, Stage]:
    """Cut the world group into pp stages of TP ranks: this rank's TP context (its stage's group, for the
    layers' all-reduces) and its `Stage`. Every rank calls it with the same arguments."""
    layout = RankLayout.of_world(world.size, pp)
    timeout = datetime.timedelta(seconds=world.timeout_s)  # a group's collectives time out like the world's
    groups = [dist.new_group(layout.stage_ranks(s), timeout=timeout) if world.communicates else None
              for s in range(pp)]
    stage = layout.stage_of(world.rank)
    group = weakref.ref(groups[stage]) if groups[stage] is not None else None  # held by torch until shutdown
    tp = replace(world, rank=layout.tp_rank_of(world.rank), size=layout.tp, group_ref=group)
    return tp, Stage(split, stage, world.rank, layout)


def send(t: torch.Tensor, dst: int) -> None:
    """Blocking send on the world group (its timeout applies)."""
    dist.send(t.contiguous(), dst)


def recv(t: torch.Tensor, src: int) -> torch.Tensor:
    """Blocking receive into `t` on the world group; raises when `src` sends nothing within the timeout."""
    dist.recv(t, src)
    return t


class Outbox:
    """Non-blocking sends on the world group: each send's tensor and work handle stay here until `wait`,
    which the engine calls before its next plan (the receiver takes them at its next iteration)."""

    def __init__(self, timeout_s: float):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.sending: list[tuple[dist.Work, torch.Tensor]] = []

    def post(self, t: torch.Tensor, dst: int) -> None:
        t = t.contiguous()
        self.sending.append((dist.isend(t, dst), t))

    def wait(self) -> None:
        """Every posted send done; raises when a receiver takes nothing within the timeout."""
        for work, _ in self.sending:
            if work.wait(self.timeout) is False:
                raise RuntimeError(f"a send found no receiver within {self.timeout.total_seconds():.0f} s")
        self.sending.clear()
