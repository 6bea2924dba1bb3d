"""Rank 0's iteration-level scheduler: which fill owns which cache row, and which fills run next.

Each iteration the engine asks it for the cancelled requests, lets the sampler (sampler.py) choose the
other rows' tokens, and hands both back to `Scheduler.decide`, which
1. ends the fills that were cancelled or hit an end token, their cap or a stop string; a request with
   another blank goes back to the front of the waiting queue (its next fill is a fresh prefill with the
   answer spliced in);
2. packs the surviving rows to the front (moving the last rows into the holes);
3. admits waiting fills into the free rows, first come first served, within a prefill token budget; while
   rows are decoding, fills join in groups so that one prefill forward serves several (when half the
   rows are free or the oldest fill has waited `max_wait_steps` steps since the last admission).
The resulting `StepPlan` (plan.py) is what every rank applies (core.py).
"""
from __future__ import annotations

from collections import deque

from glm_tp.engine.jobs import Job
from glm_tp.engine.plan import Admission, Choice, StepPlan
from glm_tp.engine.prefix_cache import PrefixIndex, root_of
from glm_tp.text.blanks import BlankInput


class Scheduler:
    def __init__(self, max_rows: int, prefill_budget: int, max_wait_steps: int = 8,
                 prefix: PrefixIndex | None = None):
        self.max_rows, self.prefill_budget = max_rows, prefill_budget
        self.prefix = prefix  # the prefix cache's index (prefix_cache.py), None when off
        self.retry = False  # a fill waits for a prefix that this step's prefill computes: admit next step
        self.prompt_tokens = self.reused_tokens = 0  # of admitted fills; reused: copied from the prefix cache
        # while rows decode, fills join in groups (one prefill forward for several): once half of the
        # rows are free, or once the oldest has waited max_wait_steps steps since the last admission
        # (as TGI batches prefills)
        self.min_group = max(1, max_rows // 2)
        self.max_wait_steps = max_wait_steps
        self.steps = 0
        self.last_admission = 0
        self.waiting: deque[Job] = deque()
        self.rows: list[tuple[Job, int]] = []  # (job, beam index) of each occupied row [0, n)

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
    def cancelled(self) -> list[tuple[Job, str]]:
        """The cancelled requests, with their reasons; those still waiting leave the queue."""
        out = [(j, j.cancel_reason) for j in self.jobs() if j.handle.cancelled.is_set()]
        for job in [j for j in self.waiting if j.handle.cancelled.is_set()]:
            self.waiting.remove(job)
            out.append((job, job.cancel_reason))
        return out

    def decide(self, cancelled: list[tuple[Job, str]], choice: Choice) -> StepPlan:
        """End the cancelled fills and those the choice ended, pack the rows that go on, admit waiting fills."""
        plan = StepPlan(parents=[choice.parents.get(r, r) for r in range(len(self.rows))])
        for job, reason in cancelled + choice.ended:
            self._keep_prefix(job, plan)
            if job.fill is not None and reason in ("stop", "length"):
                if job.end_fill(reason):
                    job.queued_at = self.steps - self.max_wait_steps  # its next blank joins at once
                    self.waiting.appendleft(job)
                    continue
            elif reason not in ("stop", "length"):
                job.stop(reason)
            job.done()
        self._pack(plan, choice.tokens)
        if self._admission_due():
            self._admit(plan)
            self.last_admission = self.steps
        self.steps += 1
        return plan

    def _admission_due(self) -> bool:
        if not self.waiting:
            return False
        if self.retry:
            self.retry = False
            return True
        free = self.max_rows - len(self.rows)
        waited = self.steps - max(self.waiting[0].queued_at, self.last_admission)
        return not self.rows or free >= self.min_group or waited >= self.max_wait_steps

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
            job.fed += beam == 0  # this row's token goes into its cache now
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
        """Waiting fills join, first come first served, while rows are free and the padded prefill of the
        tokens they compute (those after a cached prefix) stays within the token budget (the first one always
        joins). Their first rows are consecutive, so every rank prefills them as one batch; beams' other rows
        follow. A fill that would reuse blocks this very prefill computes (n > 1 copies of one prompt) waits
        for the next step instead."""
        joining: list[tuple[Job, BlankInput, list[int], list[tuple[int, int]]]] = []
        free, width, furthest, fresh = self.max_rows - len(self.rows), 0, 0, set()
        while self.waiting:
            job = self.waiting[0]
            inp = job.next_input()
            blocks = self._match(inp)
            start = len(blocks) * self.prefix.block if blocks else 0
            new_width, new_furthest = max(width, len(inp.tokens) - start), max(furthest, start)
            if job.beams > free or (joining and (new_width * (len(joining) + 1) > self.prefill_budget
                                                 or new_furthest + new_width > job.max_len)):
                break
            if fresh.intersection(blocks):
                self.retry = True
                break
            self.waiting.popleft()
            inp = job.start_fill()
            saves = self._prompt_blocks(job, inp, blocks)
            fresh.update(b for _, b in saves)
            joining.append((job, inp, blocks, saves))
            self.prompt_tokens, self.reused_tokens = self.prompt_tokens + len(inp.tokens), self.reused_tokens + start
            free, width, furthest = free - job.beams, new_width, new_furthest
        first, extra = len(self.rows), len(self.rows) + len(joining)
        self.rows += [(job, 0) for job, *_ in joining]
        for job, inp, blocks, saves in joining:
            job.rows = [first] + list(range(extra, extra + job.beams - 1))
            self.rows += [(job, b) for b in range(1, job.beams)]
            start = len(blocks) * self.prefix.block if blocks else 0
            plan.admit.append(Admission(inp.tokens[start:], inp.positions[start:], inp.bidirectional,
                                        inp.next_position, inp.counting, first, job.rows[1:], start, blocks, saves))
            first, extra = first + 1, extra + job.beams - 1

    # -- the prefix cache ---------------------------------------------------------------------------
    def _match(self, inp: BlankInput) -> list[int]:
        if self.prefix is None:
            return []
        return self.prefix.match(root_of(inp.tokens, inp.positions, inp.bidirectional), inp.tokens, inp.positions)

    def _prompt_blocks(self, job: Job, inp: BlankInput, blocks: list[int]) -> list[tuple[int, int]]:
        """An admitted fill keeps the blocks it starts from while it runs; its prompt's other whole blocks
        go to the cache after its prefill."""
        if self.prefix is None:
            return []
        self.prefix.admit(blocks)
        job.prefix_blocks = blocks
        return self.prefix.save(root_of(inp.tokens, inp.positions, inp.bidirectional), inp.tokens, inp.positions)

    def _keep_prefix(self, job: Job, plan: StepPlan) -> None:
        """An ending fill (any reason) gives its row's whole blocks to the cache: its prompt and the tokens it
        generated that reached the cache (beams: the prompt alone, since the rows' answers differ), so a chat's
        next turn, which resends the answer, reuses them too. Its blocks are no longer pinned."""
        if self.prefix is None or job.fill is None or not job.rows:
            return
        fill = job.fill
        answer = job.generated[0][:job.fed] if job.beam is None else []
        positions = list(fill.positions) + [fill.position_after(g) for g in range(len(answer))]
        copies = self.prefix.save(root_of(fill.tokens, fill.positions, fill.bidirectional),
                                  fill.tokens + answer, positions)
        if copies:
            plan.saves.append((job.rows[0], copies))
        self.prefix.release(job.prefix_blocks)
        job.prefix_blocks = []
