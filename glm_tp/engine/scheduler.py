"""Rank 0's iteration-level scheduler: which fill owns which cache row, and what the next step does.

After every forward, `Scheduler.decide` takes the logits of the rows [0, n) and
1. drops cancelled requests;
2. chooses a token for every row: greedy, seeded sampling or beam search, each row by its own request's
   settings (bans, temperature, top-k/top-p), with logprobs where asked;
3. ends the fills that hit an end token, their cap or a stop string; a request with another blank goes
   back to the front of the waiting queue (its next fill is a fresh prefill with the answer spliced in);
4. packs the surviving rows to the front (moving the last rows into the holes);
5. admits waiting fills into the free rows, first come first served, within a prefill token budget; while
   rows are decoding, fills join in groups so that one prefill forward serves several (when half the
   rows are free or the oldest fill has waited `max_wait_steps` steps since the last admission).
The resulting `StepPlan` is what every rank applies (engine.py). A request's tokens depend only on its
own rows and its own random stream, never on what else runs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from glm_tp.engine.jobs import Job
from glm_tp.engine.sampling import ban_tokens, sampled_logits
from glm_tp.engine.types import TokenLogprob
from glm_tp.text.blanks import Position


@dataclass
class Admission:
    """A fill every rank prefills into `row`, then copies into `copies_to` (the other beams)."""

    tokens: list[int]
    positions: list[Position]
    bidirectional: int
    first_position: Position  # an int, or a (position, block position) pair for 2D positions
    counting: Position
    row: int
    copies_to: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    parents: list[int] = field(default_factory=list)           # rows [0, n_old): beam parents (else i)
    moves: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) packing moves, after parents
    tokens: list[int] = field(default_factory=list)            # next token of the kept rows [0, n_keep)
    admit: list[Admission] = field(default_factory=list)


class Scheduler:
    def __init__(self, engine, max_rows: int, prefill_budget: int, max_wait_steps: int = 8):
        self.engine, self.max_rows, self.prefill_budget = engine, max_rows, prefill_budget
        # while rows decode, fills join in groups (one prefill forward for several): once half of the
        # rows are free, or once the oldest has waited max_wait_steps steps since the last admission
        # (as TGI batches prefills)
        self.min_group = max(1, max_rows // 2)
        self.max_wait_steps = max_wait_steps
        self.steps = 0
        self.last_admission = 0
        self.waiting: deque[Job] = deque()
        self.rows: list[tuple[Job, int]] = []  # (job, beam index) of each occupied row [0, n)
        self.finished: list[Job] = []          # ended since the caller last looked

    @property
    def running(self) -> int:
        return len({id(job) for job, _ in self.rows})

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, job: Job) -> None:
        job.queued_at = self.steps
        self.waiting.append(job)

    def jobs(self) -> list[Job]:
        """The requests with rows, each once, in row order."""
        return list({id(j): j for j, _ in self.rows}.values())

    def stop_all(self, reason: str) -> None:
        """End every request at the next decision (Ctrl-C: reason 'interrupted')."""
        for job in self.jobs() + list(self.waiting):
            job.cancel_reason = reason
            job.handle.cancel()

    # -- one decision -------------------------------------------------------------------------------
    def decide(self, logits: torch.Tensor | None) -> StepPlan:
        plan = StepPlan(parents=list(range(len(self.rows))))
        next_token: dict[int, int] = {}
        ended: list[tuple[Job, str]] = self._cancelled()
        if logits is not None:
            ended += self._choose(logits, plan.parents, next_token)
        for job, reason in ended:
            if job.fill is not None and reason in ("stop", "length"):
                if job.end_fill(reason):
                    job.queued_at = self.steps - self.max_wait_steps  # its next blank joins at once
                    self.waiting.appendleft(job)
                    continue
            elif reason not in ("stop", "length"):
                job.stop(reason)
            self.finished.append(job)
            job.done()
        self._pack(plan, next_token)
        if self._admission_due():
            self._admit(plan)
            self.last_admission = self.steps
        self.steps += 1
        return plan

    def _admission_due(self) -> bool:
        if not self.waiting:
            return False
        free = self.max_rows - len(self.rows)
        waited = self.steps - max(self.waiting[0].queued_at, self.last_admission)
        return not self.rows or free >= self.min_group or waited >= self.max_wait_steps

    def _cancelled(self) -> list[tuple[Job, str]]:
        out = [(j, j.cancel_reason) for j in self.jobs() if j.handle.cancelled.is_set()]
        for job in [j for j in self.waiting if j.handle.cancelled.is_set()]:
            self.waiting.remove(job)
            out.append((job, job.cancel_reason))
        return out

    def _choose(self, logits: torch.Tensor, parents: list[int], next_token: dict[int, int]) -> list[tuple[Job, str]]:
        jobs = [j for j in self.jobs() if not j.handle.cancelled.is_set()]
        scores = logits.float()
        scores.masked_fill_(self.engine.banned_on(scores.device)[: scores.shape[-1]], float("-inf"))
        for job in jobs:
            cfg = job.config
            if cfg.min_new_tokens or cfg.no_repeat_ngram_size:
                for beam, row in enumerate(job.rows):
                    ban_tokens(scores[row:row + 1], [job.generated[beam]], job.end_tokens, cfg.min_new_tokens,
                               cfg.no_repeat_ngram_size)
        greedy = [j for j in jobs if j.config.strategy == "greedy" and j.config.logprobs is None]
        ended = []
        if greedy:  # one argmax over all greedy rows, on the logits' device
            picked = scores[[j.rows[0] for j in greedy]].argmax(dim=-1).tolist()
            for job, token in zip(greedy, picked):
                next_token[job.rows[0]] = token
                reason = job.take(token, None)
                if reason:
                    ended.append((job, reason))
        others = [j for j in jobs if j not in greedy]
        if others:
            ended += self._choose_on_host(others, scores, parents, next_token)
        return ended

    def _choose_on_host(self, jobs: list[Job], scores: torch.Tensor, parents: list[int],
                        next_token: dict[int, int]) -> list[tuple[Job, str]]:
        """Sampling, beam search and logprobs work on the host, each request with its own generator."""
        rows = [r for j in jobs for r in j.rows]
        host = scores[rows].cpu()
        at = {r: i for i, r in enumerate(rows)}
        sampled = [j for j in jobs if j.config.strategy == "sample"]
        if sampled:
            idx = [at[j.rows[0]] for j in sampled]
            cfgs = [j.config for j in sampled]
            host[idx] = sampled_logits(host[idx], torch.tensor([c.temperature for c in cfgs]),
                                       torch.tensor([c.top_k for c in cfgs]), torch.tensor([c.top_p for c in cfgs]))
        logprobs = host.log_softmax(dim=-1)
        ended = []
        for job in jobs:
            first = at[job.rows[0]]
            if job.beam is not None:
                picks, reason = job.take_beams(logprobs[first:first + job.beams])
                for beam, (parent, token) in enumerate(picks):
                    parents[job.rows[beam]] = job.rows[parent]
                    next_token[job.rows[beam]] = token
            else:
                if job.config.strategy == "sample":
                    token = int(torch.multinomial(host[first].softmax(dim=-1), 1, generator=job.generator)[0])
                else:
                    token = int(logprobs[first].argmax())
                next_token[job.rows[0]] = token
                reason = job.take(token, self._logprob(logprobs[first], token, job.config.logprobs))
            if reason:
                ended.append((job, reason))
        return ended

    def _logprob(self, logprobs: torch.Tensor, token: int, top: int | None) -> TokenLogprob | None:
        if top is None:
            return None
        decode = self.engine.tok.decode
        alternatives = []
        if top:
            values, ids = logprobs.topk(top)
            alternatives = [(int(i), decode([int(i)]), float(v)) for v, i in zip(values, ids)]
        return TokenLogprob(token, decode([token]), float(logprobs[token]), alternatives)

    # -- rows ---------------------------------------------------------------------------------------
    def _pack(self, plan: StepPlan, next_token: dict[int, int]) -> None:
        """Keep the rows of fills still running, packed at the front: the last kept rows move into holes."""
        keep = [r for r, (job, _) in enumerate(self.rows) if job.fill is not None and r in next_token]
        n = len(keep)
        holes = [r for r in range(n) if r not in keep]
        movers = [r for r in keep if r >= n]
        moved = dict(zip(movers, holes))
        plan.moves = list(moved.items())
        new_rows: list[tuple[Job, int] | None] = [None] * n
        for r in keep:
            dst = moved.get(r, r)
            job, beam = self.rows[r]
            job.rows[beam] = dst
            new_rows[dst] = (job, beam)
        self.rows = new_rows  # type: ignore[assignment]
        plan.tokens = [next_token[moved_from] for moved_from in self._sources(keep, moved, n)]

    @staticmethod
    def _sources(keep: list[int], moved: dict[int, int], n: int) -> list[int]:
        """For each packed row [0, n), the old row its token was chosen for."""
        source = {moved.get(r, r): r for r in keep}
        return [source[d] for d in range(n)]

    def _admit(self, plan: StepPlan) -> None:
        """Waiting fills join, first come first served, while rows are free and the padded prefill stays
        within the token budget (the first one always joins). Their first rows are consecutive, so every
        rank prefills them as one batch; beams' other rows follow."""
        jobs: list[Job] = []
        free, width = self.max_rows - len(self.rows), 0
        while self.waiting:
            job = self.waiting[0]
            new_width = max(width, len(job.ids) + 1)
            if job.beams > free or (jobs and new_width * (len(jobs) + 1) > self.prefill_budget):
                break
            jobs.append(self.waiting.popleft())
            free -= job.beams
            width = new_width
        first, extra = len(self.rows), len(self.rows) + len(jobs)
        self.rows += [(job, 0) for job in jobs]
        for job in jobs:
            inp = job.start_fill()
            job.rows = [first] + list(range(extra, extra + job.beams - 1))
            self.rows += [(job, b) for b in range(1, job.beams)]
            plan.admit.append(Admission(inp.tokens, inp.positions, inp.bidirectional, inp.next_position,
                                        inp.counting, first, job.rows[1:]))
            first, extra = first + 1, extra + job.beams - 1
