"""The generation engine: continuous batching of blank fills over a tensor-parallel model.

Every rank holds an `Engine` and runs the same forward passes; rank 0 alone decides (scheduler.py).
An iteration: rank 0's scheduler turns the last logits into a `StepPlan` (beam parents, packing moves,
each kept row's next token, fills to admit), broadcasts it, and every rank applies it to its `Decoder`:
one decode step for the kept rows, one prefill per admitted fill. The plan travels as one fixed-size
tensor; packing moves and admissions, when there are any, follow as one object broadcast.

Commands in the tensor's first slot: STEP (apply the plan), IDLE (keep-alive while rank 0 waits for
work: a lost rank still fails the collective), END (an `Engine.generate` call is over) and SHUTDOWN.
"""
from __future__ import annotations

import torch

from glm_tp.engine.decoder import Decoder
from glm_tp.engine.jobs import Job, error_result
from glm_tp.engine.scheduler import Admission, Scheduler, StepPlan
from glm_tp.engine.types import GenerationConfig, Request, RequestHandle, Result
from glm_tp.model.glm import GLMModel
from glm_tp.text.tokenizer import GLMTokenizer

STEP, IDLE, END, SHUTDOWN = 0, 1, 2, 3
HEADER = 4  # cmd, rows before the step, rows kept, whether an object follows


class Engine:
    def __init__(self, model: GLMModel, tokenizer: GLMTokenizer, default: GenerationConfig | None = None,
                 max_batch: int = 8, max_len: int | None = None, cuda_graphs: bool | None = None,
                 prefill_budget: int | None = None):
        self.model, self.tok, self.tp = model, tokenizer, model.tp
        self.default = default or GenerationConfig()
        self.max_batch = max_batch
        # the KV cache: max_batch rows of max_len tokens (default: the model's), allocated once
        self.decoder = Decoder(model, max_batch, max_len, graphs=cuda_graphs,
                               position_dims=2 if model.cfg.position_encoding == "2d" else 1)
        self.rows = 0  # rows in use, the same on every rank
        # rank 0: the scheduler and the logits of rows [0, rows) that await its decision
        # prefill tokens per step (padded): at least one whole prompt, and room to batch several
        budget = prefill_budget or max(2048, self.decoder.max_len)
        self.scheduler = Scheduler(self, max_batch, budget) if self.tp.is_first else None
        self.logits: torch.Tensor | None = None
        special = tokenizer.special
        # only text tokens and the end tokens may be generated: never masks, sop or padding
        self.banned = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
        lo = tokenizer.offset
        self.banned[lo:min(lo + tokenizer.text_vocab_size, model.cfg.vocab_size)] = False
        self.banned[[special.eop, special.eos]] = False
        self._banned_on: dict[torch.device, torch.Tensor] = {}

    def banned_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._banned_on:
            self._banned_on[device] = self.banned.to(device)
        return self._banned_on[device]

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    def new_job(self, handle: RequestHandle) -> Job:
        """Rank 0: check and tokenize a request (PromptError/ValueError when it can never run)."""
        job = Job(handle, self.default, self.tok, self.model.cfg.vocab_size, self.max_len,
                  self.model.cfg.position_encoding)
        if job.beams > self.max_batch:
            raise ValueError(f"num_beams {job.beams} needs more cache rows than batch_size {self.max_batch}: "
                             f"lower num_beams or raise batch_size")
        return job

    # -- every rank: the same requests, run to the end (tests, tools, the Python API) --------------
    def generate(self, requests: list[Request]) -> list[Result]:
        """Call on every rank with the same requests; every rank returns the results (rank 0 sends them)."""
        if not self.tp.is_first:
            self.follow(until=END)
            return self.tp.broadcast_object(None)
        results: dict[int, Result] = {}
        handles = []
        for i, request in enumerate(requests):
            handle = RequestHandle(request)
            try:
                self.scheduler.add(self.new_job(handle))
                handles.append(handle)
            except ValueError as e:
                results[i] = error_result(request.id, str(e))
        while self.scheduler.busy:
            self.lead()
        self.send(END)
        done = iter(h.result() for h in handles)
        return self.tp.broadcast_object([results[i] if i in results else next(done) for i in range(len(requests))])

    # -- rank 0 -------------------------------------------------------------------------------------
    def lead(self) -> None:
        """One iteration: decide, broadcast the plan, apply it."""
        plan = self.scheduler.decide(self.logits)
        self.send(STEP, plan)
        self.logits = self.apply(plan)

    def send(self, command: int, plan: StepPlan | None = None) -> None:
        if not self.tp.communicates:  # one rank: nobody to tell
            return
        message = torch.zeros(HEADER + 2 * self.max_batch, dtype=torch.long)
        message[0] = command
        if plan is not None:
            extra = bool(plan.moves or plan.admit)
            message[1:4] = torch.tensor([len(plan.parents), len(plan.tokens), int(extra)])
            message[HEADER:HEADER + len(plan.parents)] = torch.tensor(plan.parents, dtype=torch.long)
            message[HEADER + self.max_batch:HEADER + self.max_batch + len(plan.tokens)] = \
                torch.tensor(plan.tokens, dtype=torch.long)
        self.tp.broadcast(message.to(self.model.device))
        if plan is not None and (plan.moves or plan.admit):
            self.tp.broadcast_object((plan.moves, plan.admit))

    # -- ranks > 0 ----------------------------------------------------------------------------------
    def follow(self, until: int) -> int:
        """Apply rank 0's plans until it sends `until` (or SHUTDOWN); returns the command that ended it."""
        while True:
            message = self.tp.broadcast(torch.zeros(HEADER + 2 * self.max_batch, dtype=torch.long,
                                                    device=self.model.device)).cpu()
            command = int(message[0])
            if command == STEP:
                self.apply(self._receive(message))
            elif command in (until, SHUTDOWN):
                return command

    def _receive(self, message: torch.Tensor) -> StepPlan:
        n_old, n_keep, extra = (int(v) for v in message[1:4])
        m = self.max_batch
        plan = StepPlan(parents=message[HEADER:HEADER + n_old].tolist(),
                        tokens=message[HEADER + m:HEADER + m + n_keep].tolist())
        if extra:
            plan.moves, plan.admit = self.tp.broadcast_object(None)
        return plan

    # -- every rank ---------------------------------------------------------------------------------
    def apply(self, plan: StepPlan) -> torch.Tensor | None:
        """Run a plan on this rank's cache; returns the logits of the rows in use afterwards (rank 0)."""
        decoder = self.decoder
        with torch.inference_mode():
            if any(p != i for i, p in enumerate(plan.parents)):
                decoder.reorder(plan.parents)
            for src, dst in plan.moves:
                decoder.copy_row(src, dst)
            outs = []
            if plan.tokens:
                outs.append(decoder.step(torch.tensor(plan.tokens, dtype=torch.long, device=self.model.device)))
            if plan.admit:
                outs.append(self._prefill(plan.admit))
        self.rows = len(plan.tokens) + sum(1 + len(a.copies_to) for a in plan.admit)
        return torch.cat(outs) if outs and outs[0] is not None else None

    def _prefill(self, admit: list[Admission]) -> torch.Tensor | None:
        """The admitted fills as one right-padded batch into their first rows, then the beams' copies; returns
        logits in row order (first rows, then the copies)."""
        width = max(len(a.tokens) for a in admit)
        pad = self.tok.special.pad
        tokens = torch.tensor([a.tokens + [pad] * (width - len(a.tokens)) for a in admit])
        zero = admit[0].positions[0]  # 0, or (0, 0) for 2D positions
        positions = torch.tensor([a.positions + [zero] * (width - len(a.positions)) for a in admit])
        column = [torch.tensor([getattr(a, key) for a in admit]) for key in ("bidirectional", "first_position", "counting")]
        lengths = torch.tensor([len(a.tokens) for a in admit])
        logits = self.decoder.prefill(tokens, positions, *column, row=admit[0].row, lengths=lengths)
        sources = []
        for i, a in enumerate(admit):  # beams start from the same prompt
            for dst in a.copies_to:
                self.decoder.copy_row(a.row, dst)
                sources.append(i)
        if logits is None or not sources:
            return logits
        return torch.cat([logits, logits[sources]])
