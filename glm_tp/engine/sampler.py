"""Rank 0's token choice: the next token of every row from the last step's logits.

Each row by its own request's settings: greedy, seeded sampling or beam search, bans (min_new_tokens,
no_repeat_ngram_size, and the tokens no request may generate), temperature, top-k/top-p, with logprobs
where asked. A request's tokens depend only on its own rows and its own random stream.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from glm_tp.engine.constraints import ConstraintError
from glm_tp.engine.jobs import Job
from glm_tp.engine.plan import Choice
from glm_tp.engine.sampling import ban_tokens, sampled_logits
from glm_tp.engine.types import LOGPROB_FLOOR, TokenLogprob
from glm_tp.text.tokenizer import GLMTokenizer


def banned_tokens(vocab_size: int, tok: GLMTokenizer, stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """True for the ids never generated: only text tokens and the end tokens may be (eos, eop and the model's
    stop ids such as GLM-4's <|user|>, which end an answer; no masks, sop, other roles, padding)."""
    banned = torch.ones(vocab_size, dtype=torch.bool)
    lo = tok.offset
    banned[lo:min(lo + tok.text_vocab_size, vocab_size)] = False
    banned[[t for t in (tok.special.eop, tok.special.eos, *stop_ids) if 0 <= t < vocab_size]] = False
    return banned


CONTEXT = 8  # answer tokens decoded before a logprob's token, to read it in context


@dataclass
class GrammarTime:
    """The time grammars took (the sampler's masks and ends, engine/grammar.py's advances), over the steps with a
    constrained row."""

    seconds: float = 0.0
    steps: int = 0  # steps with at least one constrained row
    rows: int = 0   # constrained rows, summed over those steps


class Sampler:
    def __init__(self, banned: torch.Tensor, decode: Callable[[list[int]], str]):
        """banned: True for ids never chosen; decode: the text of ids, for logprobs."""
        self.banned, self.decode = banned, decode
        self._banned_on: dict[torch.device, torch.Tensor] = {}
        self.grammar = GrammarTime()

    def _banned(self, device: torch.device) -> torch.Tensor:
        if device not in self._banned_on:
            self._banned_on[device] = self.banned.to(device)
        return self._banned_on[device]

    def choose(self, jobs: list[Job], logits: torch.Tensor) -> Choice:
        """The next token of each of the jobs' rows (`logits` rows are cache rows); the jobs take them.
        Whatever fails for one request (its bans, its distribution, taking its token) ends that request
        with an error, never the step: the other rows get their tokens as if it had not been there."""
        choice = Choice()
        scores = logits.float()
        scores.masked_fill_(self._banned(scores.device)[: scores.shape[-1]], float("-inf"))
        constrained = sum(j.constraint is not None for j in jobs)
        if constrained:
            self.grammar.steps, self.grammar.rows = self.grammar.steps + 1, self.grammar.rows + constrained
        live = [j for j in jobs if _guarded(j, choice, lambda j=j: _ban(j, scores, self.grammar))]
        greedy = [j for j in live if j.config.strategy == "greedy" and j.config.logprobs is None]
        if greedy:  # one argmax over all greedy rows, on the logits' device
            picked = scores[[j.rows[0] for j in greedy]].argmax(dim=-1).tolist()
            for job, token in zip(greedy, picked):
                _guarded(job, choice, lambda job=job, token=token: _single(choice, job, token, job.take(token, None)))
        others = [j for j in live if j not in greedy]
        if others:
            self._choose_on_host(others, scores, choice)
        return choice

    def _choose_on_host(self, jobs: list[Job], scores: torch.Tensor, choice: Choice) -> None:
        """Sampling, beam search and logprobs work on the host, each request with its own generator."""
        rows = [r for j in jobs for r in j.rows]
        host = scores[rows].cpu()
        at = {r: i for i, r in enumerate(rows)}
        sampled = [j for j in jobs if j.config.strategy == "sample"]
        try:  # all sampled rows at once; should that fail, each alone, so that only the culprit fails
            _sample(sampled, host, at)
        except Exception:  # noqa: BLE001
            jobs = [j for j in jobs if j not in sampled or _guarded(j, choice, lambda j=j: _sample([j], host, at))]
        logprobs = host.log_softmax(dim=-1)
        for job in jobs:
            _guarded(job, choice, lambda job=job: self._take(job, host, logprobs, at[job.rows[0]], choice))

    def _take(self, job: Job, host: torch.Tensor, logprobs: torch.Tensor, first: int, choice: Choice) -> None:
        if job.beam is not None:
            picks, reason = job.take_beams(logprobs[first:first + job.beams])
            for beam, (parent, token) in enumerate(picks):
                choice.parents[job.rows[beam]] = job.rows[parent]
                choice.tokens[job.rows[beam]] = token
            if reason:
                choice.ended.append((job, reason))
            return
        if job.config.strategy == "sample":
            token = int(torch.multinomial(host[first].softmax(dim=-1), 1, generator=job.generator)[0])
        else:
            token = int(logprobs[first].argmax())
        lp = self._logprob(logprobs[first], token, job.config.logprobs, job.generated[0][-CONTEXT:])
        _single(choice, job, token, job.take(token, lp))

    def _logprob(self, logprobs: torch.Tensor, token: int, top: int | None, before: list[int]) -> TokenLogprob | None:
        if top is None:
            return None
        alternatives = []
        if top:
            values, ids = logprobs.topk(top)
            alternatives = [(int(i), self._text(before, int(i)), _finite(v)) for v, i in zip(values, ids)]
        return TokenLogprob(token, self._text(before, token), _finite(logprobs[token]), alternatives)

    def _text(self, before: list[int], token: int) -> str:
        """A token's text as it reads after the answer's tokens so far: alone, a word piece's leading space
        (or a lone space) decodes to nothing, and the tokens would not add up to the answer's text."""
        head = self.decode(before)
        text = self.decode(before + [token])
        return text[len(head):] if text.startswith(head) else self.decode([token])


def _finite(logprob: torch.Tensor) -> float:
    """A token top-k/top-p or a ban ruled out has probability 0: its log is -inf, which JSON cannot carry."""
    return max(float(logprob), LOGPROB_FLOOR)


def _ban(job: Job, scores: torch.Tensor, timing: GrammarTime) -> None:
    if job.constraint is not None:
        start = time.perf_counter()
        try:
            _constrain(job, scores)
        finally:
            timing.seconds += time.perf_counter() - start
    cfg = job.config
    if cfg.min_new_tokens or cfg.no_repeat_ngram_size:
        for beam, row in enumerate(job.rows):
            ban_tokens(scores[row:row + 1], [job.generated[beam]], job.end_tokens, cfg.min_new_tokens,
                       cfg.no_repeat_ngram_size)
    if job.constraint is not None and bool(torch.isneginf(scores[job.rows[0]]).all()):
        raise ConstraintError("its constraint (with its bans) allows no token the model may generate here")


def _constrain(job: Job, scores: torch.Tensor) -> None:
    """A constrained fill's row keeps only the ids its constraint allows, and its end tokens only where the
    constraint may end; a row left with no choice is an error for its request."""
    constraint = job.constraint
    if constraint is None:
        return
    row = scores[job.rows[0]]
    ends = torch.tensor(job.end_tokens, device=row.device)
    end_scores = row[ends].clone()
    allowed = constraint.mask()
    if allowed is not None:
        row.masked_fill_(~allowed[: row.shape[-1]].to(row.device), float("-inf"))
    row[ends] = end_scores if constraint.can_end() else float("-inf")


def _sample(jobs: list[Job], host: torch.Tensor, at: dict[int, int]) -> None:
    """Replace the sampled rows' scores by the distribution each draws from."""
    if not jobs:
        return
    idx = [at[j.rows[0]] for j in jobs]
    cfgs = [j.config for j in jobs]
    host[idx] = sampled_logits(host[idx], torch.tensor([c.temperature for c in cfgs]),
                               torch.tensor([c.top_k for c in cfgs]), torch.tensor([c.top_p for c in cfgs]))


def _single(choice: Choice, job: Job, token: int, reason: str) -> None:
    """A single-row fill's token, and why it ended ('' while it goes on)."""
    choice.tokens[job.rows[0]] = token
    if reason:
        choice.ended.append((job, reason))


def _guarded(job: Job, choice: Choice, work: Callable[[], None]) -> bool:
    """Run one request's part of the decision; if it fails, the request ends with the error (its rows get
    no token, so the scheduler frees them) and False is returned."""
    try:
        work()
        return True
    except Exception as e:  # noqa: BLE001 - one request's failure must not end the others
        first = (str(e).strip().splitlines() or [""])[0][:200]
        job.error = f"generation failed while choosing its next token ({type(e).__name__}: {first})"
        print(f"request {job.handle.id}: {job.error}", file=sys.stderr, flush=True)
        for row in job.rows:
            choice.tokens.pop(row, None)
            choice.parents.pop(row, None)
        choice.ended = [(j, r) for j, r in choice.ended if j is not job] + [(job, "error")]
        return False
