"""The generation engine: continuous batching of fills (GLM blanks, or a causal model's continuation) over a
tensor-parallel model.

Every rank holds an `Engine` and runs the same forward passes; rank 0 alone decides. An iteration:
rank 0's sampler (sampler.py) chooses the rows' tokens from the last logits, its scheduler
(scheduler.py) turns that choice into a `StepPlan` (beam parents, packing moves, each kept row's next
token, fills to admit), rank 0 broadcasts it (plan.py) and every rank applies it to its `Decoder`: one
decode step for the kept rows, one prefill per admitted fill. With pipeline stages the rows split into lanes
whose plans are in flight at once, one stage each (lanes.py).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from glm_tp.engine.constraints import ConstraintFactory, Grammar
from glm_tp.engine.decoder import Decoder
from glm_tp.engine.grammar import Grammars
from glm_tp.engine.jobs import Job
from glm_tp.engine.lanes import Lane, LaneSchedulers, Schedule, lane_count, lane_rows
from glm_tp.engine.plan import (
    END,
    IDLE,
    SHUTDOWN,
    STEP,
    Admission,
    Choice,
    StepPlan,
    decode_plan,
    encode_plan,
    message_size,
)
from glm_tp.engine.prefix_cache import BLOCK, PrefixIndex, blocks_for, prefix_stats
from glm_tp.engine.sampler import Sampler, banned_tokens
from glm_tp.engine.scheduler import Scheduler
from glm_tp.engine.types import GenerationConfig, Request, RequestHandle, Result
from glm_tp.model.glm import GLMModel
from glm_tp.text.blanks import INVALID_PROMPT
from glm_tp.text.tokenizer import GLMTokenizer

KEEPALIVE_S = 10.0  # at most this long between collectives while idle (and several per timeout)


class Engine:
    def __init__(self, model: GLMModel, tokenizer: GLMTokenizer, default: GenerationConfig | None = None,
                 max_batch: int = 8, max_len: int | None = None, cuda_graphs: bool | None = None,
                 prefill_budget: int | None = None, prefix_cache_tokens: int = 0, pipeline_lanes: int | None = None):
        # the engine's broadcasts reach every rank: under pipeline parallelism the world, not the stage's group
        self.model, self.tok, self.tp = model, tokenizer, model.world
        self.default = default or GenerationConfig()
        self.max_batch = max_batch
        # the KV cache: max_batch rows of max_len tokens (default: the model's), allocated once, split
        # across the lanes; the prefix cache's pool: prefix_cache_tokens in whole blocks (0: off)
        blocks = blocks_for(prefix_cache_tokens)
        stages = model.stage.split.stages if model.stage is not None else 1
        lanes = lane_count(stages, max_batch, bool(blocks), pipeline_lanes)
        # a lane's sends are posted from the host each step (lanes.Schedule), so its steps run eagerly
        graphs = False if lanes > 1 else cuda_graphs
        self.lanes = [Lane(Decoder(model, rows, max_len, graphs=graphs,
                                   position_dims=2 if model.cfg.position_encoding == "2d" else 1,
                                   prefix_blocks=blocks, block=BLOCK)) for rows in lane_rows(max_batch, lanes)]
        self.decoder = self.lanes[0].decoder  # the whole cache with one lane (tests and tools reach into it)
        self.schedule = Schedule(model, stages) if lanes > 1 else None
        prefix = PrefixIndex(blocks, BLOCK) if blocks and self.tp.is_first else None
        # rank 0: each lane's scheduler (the front ends see them as one) and the sampler; a scheduler's
        # prefill tokens per step (padded): at least one whole prompt, and room to batch several
        budget = prefill_budget or max(2048, self.decoder.max_len)
        self.scheduler: Scheduler | LaneSchedulers | None = None
        if self.tp.is_first:
            for lane in self.lanes:
                lane.scheduler = Scheduler(lane.decoder.max_rows, budget, prefix=prefix)
            self.scheduler = self.lanes[0].scheduler if lanes == 1 else \
                LaneSchedulers([lane.scheduler for lane in self.lanes])
        banned = banned_tokens(model.cfg.vocab_size, tokenizer, model.cfg.stop_ids)
        self.sampler = Sampler(banned, tokenizer.decode) if self.tp.is_first else None
        # rank 0: grammars over the model's vocabulary, built on first use (llguidance is optional)
        self.compiler = Grammars(tokenizer, model.cfg.vocab_size, tokenizer.special.eop, self.sampler.grammar) \
            if self.tp.is_first else None

    def grammars(self, grammar: Grammar) -> ConstraintFactory:
        """The constraint factory of a grammar over this model's vocabulary, compiled once per distinct
        grammar; raises ConstraintError (a grammar that does not compile, no grammar library)."""
        return self.compiler.factory(grammar)

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    def stats(self) -> dict[str, float]:
        """Rank 0: prefill and prefix-cache figures (prompt tokens, reused tokens, hit rate, blocks used)."""
        s = self.scheduler
        return prefix_stats(s.prompt_tokens, s.reused_tokens, s.prefix)

    def accept(self, request: Request, listener: Callable | None = None) -> tuple[RequestHandle, Job | None]:
        """Rank 0: check and tokenize a request. Its handle, and its job unless it can never run: then the
        handle is already done with the error (a PromptError's code; a bad setting is an invalid prompt)."""
        handle = RequestHandle(request, listener)
        try:
            cfg = self.model.cfg
            job = Job(handle, self.default, self.tok, cfg.vocab_size, self.max_len, cfg.position_encoding,
                      cfg.causal, cfg.stop_ids)
            if request.grammar is not None and job.constraint_factory is None:
                job.constraint_factory = self.grammars(request.grammar)
        except ValueError as e:
            return RequestHandle.refused(request, str(e), getattr(e, "code", INVALID_PROMPT), listener), None
        widest = max(lane.decoder.max_rows for lane in self.lanes)
        if job.beams > widest:
            rows = f"batch_size {self.max_batch}" if len(self.lanes) == 1 else \
                f"a pipeline lane's {widest} (batch_size {self.max_batch} over {len(self.lanes)} lanes)"
            message = f"num_beams {job.beams} needs more cache rows than {rows}: lower num_beams or raise batch_size"
            return RequestHandle.refused(request, message, INVALID_PROMPT, listener), None
        return handle, job

    # -- every rank: the same requests, run to the end (tests, tools, the Python API) --------------
    def generate(self, requests: list[Request]) -> list[Result]:
        """Call on every rank with the same requests; every rank returns the results (rank 0 sends them)."""
        if not self.tp.is_first:
            self.follow(until=END)
            return self.tp.broadcast_object(None)
        handles = []
        for request in requests:
            handle, job = self.accept(request)
            if job is not None:
                self.scheduler.add(job)
            handles.append(handle)
        self.drive(lambda: all(h.done for h in handles))
        self.send(END)
        return self.tp.broadcast_object([h.result() for h in handles])

    # -- rank 0 -------------------------------------------------------------------------------------
    def drive(self, finished: Callable[[], bool], take: Callable[[float], bool] | None = None,
              interrupt: Callable[[], bool] | None = None, keepalive_s: float | None = None) -> None:
        """Rank 0's one engine loop, which every front end runs. Steps while the scheduler has work, first
        admitting what `take(wait_s)` hands it (a coordinator's inbox); while idle, sends keep-alives so the
        other ranks never reach the collective timeout. `interrupt()`, polled every step, ends every request
        with finish_reason 'interrupted'. `finished()` is polled every step too (a caller's chance to feed
        and collect); once true, requests still waiting are cancelled, those running finish, and it returns."""
        take = take or (lambda wait_s: False)
        keepalive_s = keepalive_s or min(KEEPALIVE_S, self.tp.timeout_s / 4)
        scheduler, interrupted, idle_since = self.scheduler, False, time.monotonic()
        while True:
            if not interrupted and interrupt is not None and interrupt():
                take(0.0)
                scheduler.stop_all("interrupted")
                interrupted = True
            if finished():
                take(0.0)
                for job in scheduler.waiting:
                    job.handle.cancel()
                if not scheduler.busy:
                    return
            if take(0.0 if scheduler.busy else 0.05) or scheduler.busy:
                self.lead()
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= keepalive_s:
                self.send(IDLE)
                idle_since = time.monotonic()

    def lead(self) -> None:
        """One iteration: choose tokens, decide, broadcast the plan, apply it. With lanes: that of the slot
        whose turn it is, once its logits are back; this stage runs it now, the later ones after it."""
        if self.schedule is None:
            lane = self.lanes[0]
            plan = self._decide(lane)
            self.send(STEP, plan)
            lane.logits = self.apply(plan)
            return
        slot, plan = self.schedule.next_slot(), StepPlan()
        if slot < len(self.lanes):  # the other slots keep the lanes' turns P iterations apart
            self._collect(slot)
            plan = self._decide(self.lanes[slot])
        self.send(STEP, plan, slot)
        self._run_due(slot, plan)

    def _decide(self, lane: Lane) -> StepPlan:
        """Choose a lane's tokens from its logits and decide its next plan."""
        scheduler = lane.scheduler
        cancelled = scheduler.cancelled()
        choice = Choice()
        if lane.logits is not None:
            # the cancelled get no token; one cancelled after this look goes on until the next step's
            gone = {id(job) for job, _ in cancelled}
            choice = self.sampler.choose([j for j in scheduler.jobs() if id(j) not in gone], lane.logits)
            lane.logits = None
        return scheduler.decide(cancelled, choice)

    def send(self, command: int, plan: StepPlan | None = None, slot: int = 0) -> None:
        if not self.tp.communicates:  # one rank: nobody to tell
            return
        message = encode_plan(command, plan, self.max_batch)
        if self.schedule is not None:  # the plan's lane slot rides last
            message = torch.cat([message, torch.tensor([slot])])
        self.tp.broadcast(message.to(self.model.device))
        if plan is not None and plan.has_extra:
            self.tp.broadcast_object((plan.moves, plan.admit, plan.saves))
        if command != STEP and self.schedule is not None:
            self._drain()

    # -- ranks > 0 ----------------------------------------------------------------------------------
    def follow(self, until: int) -> int:
        """Apply rank 0's plans until it sends `until` (or SHUTDOWN); returns the command that ended it."""
        size = message_size(self.max_batch) + (self.schedule is not None)
        while True:
            message = self.tp.broadcast(torch.zeros(size, dtype=torch.long, device=self.model.device)).cpu()
            command = int(message[0])
            if command == STEP:
                plan = self._receive(message)
                if self.schedule is None:
                    self.apply(plan)
                else:
                    self._run_due(int(message[-1]), plan)
                continue
            if self.schedule is not None:
                self._drain()
            if command in (until, SHUTDOWN):
                return command

    def _receive(self, message: torch.Tensor) -> StepPlan:
        plan, extra = decode_plan(message, self.max_batch)
        if extra:
            plan.moves, plan.admit, plan.saves = self.tp.broadcast_object(None)
        return plan

    # -- every rank: lanes ---------------------------------------------------------------------------
    def _run_due(self, slot: int, plan: StepPlan) -> None:
        """Queue iteration t's plan; run the one this stage runs at t (t - stage)."""
        for due_slot, due in self.schedule.queue.push(slot, plan):
            self._run(due_slot, due)

    def _run(self, slot: int, plan: StepPlan) -> None:
        """Run one plan of a lane; its logits go (last stage) or are awaited (rank 0)."""
        schedule = self.schedule
        schedule.outbox.wait()  # earlier iterations' sends: their receivers take them at this iteration
        if slot >= len(self.lanes):
            return
        lane = self.lanes[slot]
        logits = self.apply(plan, lane)
        if not lane.rows:
            return
        if schedule.inflight is not None:
            schedule.inflight.expect(slot, lane.rows)
        elif schedule.sends_logits:
            schedule.outbox.post(logits.float(), 0)

    def _collect(self, slot: int | None = None) -> None:
        """Rank 0: the logits on their way, up to those of `slot`'s plan (None: all)."""
        for done, logits in self.schedule.inflight.receive(slot):
            self.lanes[done].logits = logits

    def _drain(self) -> None:
        """Every stage runs the plans it has queued; rank 0 receives their logits."""
        for slot, plan in self.schedule.queue.drain():
            self._run(slot, plan)
        if self.schedule.inflight is not None:
            self._collect()
        self.schedule.outbox.wait()

    # -- every rank ---------------------------------------------------------------------------------
    def apply(self, plan: StepPlan, lane: Lane | None = None) -> torch.Tensor | None:
        """Run a plan on a lane's cache rows; returns the logits of its rows in use afterwards (rank 0; with
        lanes, the last stage's TP rank 0)."""
        lane = lane or self.lanes[0]
        decoder = lane.decoder
        with torch.inference_mode():
            for row, copies in plan.saves:  # ended fills' rows, before anything moves into them
                decoder.save_blocks(row, copies)
            if any(p != i for i, p in enumerate(plan.parents)):
                decoder.reorder(plan.parents)
            for src, dst in plan.moves:
                decoder.copy_row(src, dst)
            outs = []
            if plan.tokens:
                outs.append(decoder.step(torch.tensor(plan.tokens, dtype=torch.long, device=self.model.device)))
            if plan.admit:
                outs.append(self._prefill(plan.admit, decoder))
        lane.rows = len(plan.tokens) + sum(1 + len(a.copies_to) for a in plan.admit)
        return torch.cat(outs) if outs and outs[0] is not None else None

    def _prefill(self, admit: list[Admission], decoder: Decoder) -> torch.Tensor | None:
        """The admitted fills as one right-padded batch into their first rows, then the beams' copies; returns
        logits in row order (first rows, then the copies)."""
        width = max(len(a.tokens) for a in admit)
        pad = self.tok.special.pad
        tokens = torch.tensor([a.tokens + [pad] * (width - len(a.tokens)) for a in admit])
        zero = admit[0].positions[0]  # 0, or (0, 0) for 2D positions
        positions = torch.tensor([a.positions + [zero] * (width - len(a.positions)) for a in admit])
        column = [torch.tensor([getattr(a, key) for a in admit]) for key in ("bidirectional", "first_position", "counting")]
        lengths = torch.tensor([len(a.tokens) for a in admit])
        for a in admit:  # cached prefixes first: the prompts' rest attends to them
            if a.blocks:
                decoder.load_blocks(a.row, a.blocks)
        logits = decoder.prefill(tokens, positions, *column, row=admit[0].row, lengths=lengths,
                                 starts=torch.tensor([a.start for a in admit]))
        sources = []
        for i, a in enumerate(admit):  # then the prompts' new blocks to the cache; beams start from the same prompt
            if a.saves:
                decoder.save_blocks(a.row, a.saves)
            for dst in a.copies_to:
                decoder.copy_row(a.row, dst)
                sources.append(i)
        if logits is None or not sources:
            return logits
        return torch.cat([logits, logits[sources]])
