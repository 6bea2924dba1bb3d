"""Several micro-batches in flight across pipeline stages (vLLM's "virtual engines").

With P > 1 pipeline stages and no prefix cache, rank 0's engine keeps V lanes (2 <= V <= P, `lane_count`):
each has its own share of the batch_size cache rows (its own `Decoder`, so the cache's memory does not
grow), its own `Scheduler` and the logits awaiting its next decision; a request lives in one lane.
Iterations cycle through P slots: at iteration t rank 0 decides the lane of slot t mod P (a slot past the
lanes sends an empty plan) and broadcasts plan t, tagged with its slot, to every rank. Each rank queues the
plans it receives and runs, at iteration t, plan t - s (s: its stage): stage 0 computes plan t while stage 1
computes plan t - 1, and so on. Activations of plan t leave stage s without blocking (`pipeline.Outbox`) and
are received by stage s + 1 at iteration t + 1; the last stage sends the plan's logits (its lane's rows
after the plan, fp32) to rank 0, which receives them at iteration t + P, just before that lane's next
decision. Any other command (IDLE, END, SHUTDOWN) drains: every stage runs what it has queued, and rank 0
receives the logits still on their way.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from glm_tp.engine.decoder import Decoder
from glm_tp.engine.jobs import Job
from glm_tp.engine.plan import StepPlan
from glm_tp.engine.scheduler import Scheduler
from glm_tp.model.glm import GLMModel
from glm_tp.parallel.pipeline import Outbox, recv


def lane_count(stages: int, max_batch: int, prefix_cache: bool, asked: int | None = None) -> int:
    """Lanes for this many stages: one (the stages of a step run in turn) for TP alone or with the prefix
    cache (its block pool and index are one lane's); else up to one per stage (at most `asked`, the
    pipeline_lanes setting), each keeping >= 2 rows so a two-beam request fits any lane."""
    if stages == 1 or prefix_cache:
        return 1
    return max(1, min(stages, max_batch // 2, asked or stages))


def lane_rows(max_batch: int, lanes: int) -> list[int]:
    """batch_size rows split across the lanes, the first ones taking the remainder."""
    return [max_batch // lanes + (i < max_batch % lanes) for i in range(lanes)]


class StageQueue:
    """One rank's plans received but not run yet: at iteration t, a stage `delay` steps down the pipeline runs
    the plan of iteration t - delay."""

    def __init__(self, delay: int):
        self.delay = delay
        self.plans: deque[tuple[int, StepPlan]] = deque()

    def push(self, slot: int, plan: StepPlan) -> list[tuple[int, StepPlan]]:
        """Queue iteration t's plan; the plans (slot, plan) due at t (none while the pipeline fills)."""
        self.plans.append((slot, plan))
        return [self.plans.popleft()] if len(self.plans) > self.delay else []

    def drain(self) -> list[tuple[int, StepPlan]]:
        """Every queued plan, in order (the pipeline empties)."""
        out = list(self.plans)
        self.plans.clear()
        return out


class LaneSchedulers:
    """The schedulers of all lanes as the front ends see one: a new job joins the lane with the most room
    that can hold its beams."""

    prefix = None  # the prefix cache keeps one lane (lane_count)

    def __init__(self, schedulers: list[Scheduler]):
        self.lanes = schedulers

    @property
    def waiting(self) -> list[Job]:
        return [job for s in self.lanes for job in s.waiting]

    @property
    def running(self) -> int:
        return sum(s.running for s in self.lanes)

    @property
    def busy(self) -> bool:
        return any(s.busy for s in self.lanes)

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.lanes)

    @property
    def reused_tokens(self) -> int:
        return sum(s.reused_tokens for s in self.lanes)

    def add(self, job: Job) -> None:
        fits = [s for s in self.lanes if s.max_rows >= job.beams]  # Engine.accept refused the others
        load = lambda s: len(s.rows) + sum(j.beams for j in s.waiting)  # noqa: E731
        min(fits, key=lambda s: (load(s) / s.max_rows, load(s))).add(job)

    def jobs(self) -> list[Job]:
        return [job for s in self.lanes for job in s.jobs()]

    def stop_all(self, reason: str) -> None:
        for s in self.lanes:
            s.stop_all(reason)


class InFlight:
    """Rank 0: the plans whose logits are still on their way from the last stage, in the order they come."""

    def __init__(self, vocab: int, source: int, device: torch.device):
        self.vocab, self.source, self.device = vocab, source, device
        self.plans: deque[tuple[int, int]] = deque()  # (slot, rows after the plan)
        self.most = 0  # the most plans with rows ever in flight at once (> 1: lanes overlapped)

    def expect(self, slot: int, rows: int) -> None:
        self.plans.append((slot, rows))
        self.most = max(self.most, len(self.plans))

    def receive(self, until_slot: int | None = None) -> list[tuple[int, torch.Tensor]]:
        """Receive logits in order until those of `until_slot`'s plan (None: all); (slot, logits) pairs."""
        out = []
        while self.plans and (until_slot is None or until_slot in (s for s, _ in self.plans)):
            slot, rows = self.plans.popleft()
            out.append((slot, recv(torch.empty(rows, self.vocab, dtype=torch.float32, device=self.device),
                                   self.source)))
            if slot == until_slot:
                break
        return out


@dataclass
class Lane:
    """One lane's cache rows and, on rank 0, its scheduler and the logits of its rows awaiting a decision."""

    decoder: Decoder
    scheduler: Scheduler | None = None
    logits: torch.Tensor | None = None
    rows: int = 0  # rows in use after the last plan run here, the same on every rank


class Schedule:
    """One rank's side of the lanes: its stage's queue of plans, its non-blocking sends and, on rank 0, the
    slot counter and the logits on their way."""

    def __init__(self, model: GLMModel, slots: int):
        stage = model.stage
        self.slots, self.t = slots, 0
        self.queue = StageQueue(stage.index)
        self.outbox = model.outbox = Outbox(model.world.timeout_s)
        self.inflight = InFlight(model.cfg.vocab_size, stage.last_stage_lead, model.device) \
            if model.world.is_first else None
        self.sends_logits = stage.is_last and model.tp.rank == 0  # the last stage's TP rank 0 holds them

    def next_slot(self) -> int:
        """Rank 0: the slot iteration t decides."""
        slot, self.t = self.t % self.slots, self.t + 1
        return slot
