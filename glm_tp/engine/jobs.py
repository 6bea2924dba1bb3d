"""One request on rank 0, on its way through its blanks.

A `Job` knows the fill it needs next (GLM fills blanks left to right, each as a fresh prefill with the
earlier answers spliced in; a causal model's prompt is one fill that continues it), takes the tokens the
scheduler chooses for its rows, ends a fill on an end token (eos, eop, the model's stop ids), its token cap
or a stop string, and emits what it generated as events; `result_of` builds its `Result`.
"""
from __future__ import annotations

import torch

from glm_tp.engine.constraints import Constraint, ConstraintFactory
from glm_tp.engine.sampling import BeamGroup
from glm_tp.engine.types import (
    BlankDone,
    Delta,
    Done,
    GenerationConfig,
    Request,
    RequestHandle,
    Result,
    TokenLogprob,
)
from glm_tp.text.blanks import (
    CONTEXT_LENGTH,
    BlankInput,
    PromptError,
    answer_lead,
    causal_fill,
    causal_prompt,
    check_length,
    complete_context,
    fill_kind,
    filled_text,
    next_blank,
    shown_ids,
    splice,
    tokenize_prompt,
)
from glm_tp.text.stream import StopStream, find_stop
from glm_tp.text.tokenizer import GLMTokenizer


class Job:
    def __init__(self, handle: RequestHandle, default: GenerationConfig, tok: GLMTokenizer, vocab_size: int,
                 max_len: int, position_encoding: str = "1d", causal: bool = False, stop_ids: tuple[int, ...] = ()):
        """Tokenizes and checks the request; raises PromptError/ValueError for one that can never run.
        position_encoding: the model's ("2d": ChatGLM-6B's position and block position); causal: the model
        continues a causal context instead of filling blanks (ChatGLM2/3, GLM-4); stop_ids: the model's end
        tokens besides eos and eop."""
        self.position_encoding, self.causal = position_encoding, causal
        self.handle, self.tok, self.max_len = handle, tok, max_len
        request = handle.request
        self.config = request.config or default
        self.config.validate()
        self.ids = self._prompt_ids(request, vocab_size)
        check_length(self.ids, max_len, causal)
        size = len(self.ids) + (0 if causal else 1)
        if size + self.config.max_new_tokens > max_len:
            with_sop = "" if causal else " with sop"
            raise PromptError(f"prompt is {size} tokens{with_sop} and asks for up to "
                              f"{self.config.max_new_tokens} new tokens: more than max_len {max_len}; shorten the "
                              f"prompt or lower max_new_tokens", CONTEXT_LENGTH)
        self.origin = [0] * len(self.ids)  # 0 = prompt token, k = token of blank k
        self.kind = fill_kind(self.ids, tok.special)
        self.prompt_tokens = len(self.ids)
        # the model's end tokens: eop, eos and its own stop ids (GLM-4's <|user|>), none named by the user
        self.end_tokens = list(dict.fromkeys([tok.special.eop, tok.special.eos, *stop_ids]))
        self.blank_ids: list[list[int]] = []
        self.blank_texts: list[str] = []
        self.blank_leads: list[str] = []  # each answer's leading space in context (answer_lead)
        self.beam_texts: list[str] | None = None
        self.finish, self.error = "", None
        self.cut_by_max_len = False
        self.completion_tokens = 0
        self.logprobs: list[TokenLogprob] | None = [] if self.config.logprobs is not None else None
        self.generator = torch.Generator().manual_seed(self.config.seed)  # carried from blank to blank
        self.rows: list[int] = []  # cache rows of the current fill, one per beam
        self.cancel_reason = "cancelled"
        self.queued_at = 0  # the scheduler step at which it began waiting
        self.fill: BlankInput | None = None
        self.constraint_factory: ConstraintFactory | None = request.constraint
        self.constraint: Constraint | None = None  # the current fill's, made fresh for each fill
        if (request.constraint or request.grammar) and self.config.strategy == "beam":
            raise PromptError("structured output and forced tool calls work with greedy or sampled decoding, "
                              "not strategy=beam")

    def _prompt_ids(self, request: Request, vocab_size: int) -> list[int]:
        """The context ids: given ids checked (a causal model's used verbatim, a blank model's completed),
        or the text tokenized by the model's kind."""
        if request.token_ids is not None:
            if not request.token_ids:
                raise PromptError("prompt_token_ids is empty: give the prompt's token ids")
            bad = [t for t in request.token_ids if not 0 <= int(t) < vocab_size]
            if bad:
                raise PromptError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            ids = [int(t) for t in request.token_ids]
            return ids if self.causal else complete_context(ids, self.tok.special)
        if request.text is None:
            raise PromptError("request has neither text nor token_ids")
        if not request.text.strip():  # the model would make up an answer to nothing
            blanks = "" if self.causal else " (with [MASK] or [gMASK] blanks)"
            raise PromptError(f"the prompt is empty: give some text{blanks}")
        return causal_prompt(request.text, self.tok) if self.causal else tokenize_prompt(request.text, self.tok)

    # -- the current fill ---------------------------------------------------------------------------
    @property
    def beams(self) -> int:
        return self.config.num_beams if self.config.strategy == "beam" else 1

    def next_input(self) -> BlankInput:
        """The next fill's model input (without starting it)."""
        inp = causal_fill(self.ids) if self.causal else \
            next_blank(self.ids, self.kind, self.tok.special, self.position_encoding)
        assert inp is not None
        return inp

    def start_fill(self) -> BlankInput:
        inp = self.next_input()
        self.fill, self.sent = inp, ""  # sent: the text emitted so far
        self.fed = 0  # generated tokens whose keys/values are in the row (the scheduler counts them)
        self.prefix_blocks: list[int] = []  # prefix-cache blocks the fill started from (kept while it runs)
        self.constraint = self.constraint_factory() if self.constraint_factory else None
        self.stream = StopStream(self.tok, self.config.stop)
        self.logprobs_from = len(self.logprobs or [])   # this fill's first entry in self.logprobs
        self.generated: list[list[int]] = [[] for _ in range(self.beams)]
        self.cap = min(self.config.max_new_tokens, self.max_len - len(inp.tokens))
        self.beam = BeamGroup(self.beams, self.config.length_penalty, prefix=len(inp.tokens)) \
            if self.config.strategy == "beam" else None
        return inp

    def take(self, token: int, logprob: TokenLogprob | None) -> str:
        """A chosen token for a single-row fill; returns why the fill ended ('' while it goes on)."""
        gen = self.generated[0]
        if token in self.end_tokens:
            return "stop"
        if self.constraint is not None:
            self.constraint.advance(token)
        gen.append(token)
        self.completion_tokens += 1
        if logprob is not None and self.logprobs is not None:
            self.logprobs.append(logprob)
        if self._stream(logprob) or (self.constraint is not None and self.constraint.finished()):
            return "stop"
        return "length" if len(gen) >= self.cap else ""

    def take_beams(self, logprobs: torch.Tensor) -> tuple[list[tuple[int, int]], str]:
        """One beam-search step over this fill's rows; returns (parent beam, token) per beam and why the
        fill ended ('' while it goes on)."""
        picks = self.beam.step(logprobs, self.end_tokens)
        self.generated = [list(t) for t in self.beam.live]
        if self.beam.done:
            return picks, "stop"
        return picks, "length" if len(self.beam.live[0]) >= self.cap else ""

    def _stream(self, logprob: TokenLogprob | None) -> bool:
        """Send the text that can no longer change; True when a stop string appeared."""
        safe, cut = self.stream.update(self.generated[0])
        self._delta(safe, logprob)
        return cut is not None

    def _delta(self, upto: str, logprob: TokenLogprob | None) -> None:
        new = upto[len(self.sent):] if len(upto) > len(self.sent) else ""
        lead = answer_lead(self.tok, self.ids[:self.fill.mask_index], self.generated[0]) \
            if new and not self.sent else ""
        self.sent = max(upto, self.sent, key=len)
        self.handle.emit(Delta(self.handle.id, len(self.blank_ids), [self.generated[0][-1]], new,
                               [logprob] if logprob is not None else None, lead))

    # -- ending a fill ------------------------------------------------------------------------------
    def end_fill(self, reason: str) -> bool:
        """Splice the answer in; True when another blank follows (the job waits for its next fill)."""
        answer, text = self._answer(reason)
        inp = self.fill
        number = len(self.blank_ids) + 1
        self.ids = splice(self.ids, inp.mask_index, answer)
        self.origin = self.origin[:inp.mask_index] + [number] * len(answer) + self.origin[inp.mask_index + 1:]
        self.blank_leads.append(answer_lead(self.tok, self.ids[:inp.mask_index], answer))
        self.blank_ids.append(answer)
        self.blank_texts.append(text)
        self.handle.emit(BlankDone(self.handle.id, number - 1, text, list(answer)))
        if reason == "length" and self.cap < self.config.max_new_tokens:
            self.cut_by_max_len = True
        self.finish, self.fill, self.rows = reason, None, []
        if inp.causal or self.kind not in self.ids:  # a causal model's answer is its one fill
            return False
        if len(self.ids) + 1 + 1 > self.max_len:
            self.finish, self.cut_by_max_len = "length", True  # no room for the next blank's sop and a token
            self.error = f"prompt grew to {len(self.ids)} tokens after filling a blank: no room for the next one"
            return False
        return True

    def _answer(self, reason: str) -> tuple[list[int], str]:
        if self.beam is None:
            gen = self.generated[0]
            if self.stream.cut is not None:
                kept, text = self.stream.trim(gen, self.stream.cut)
                if self.logprobs is not None:
                    del self.logprobs[self.logprobs_from + len(kept):]
                return kept, text
            return gen, self.tok.decode(gen)
        hyps = self.beam.finish()
        answers = [h.tokens[:-1] if h.tokens and h.tokens[-1] in self.end_tokens else h.tokens for h in hyps]
        self.completion_tokens += len(answers[0]) if answers else 0
        if self.config.return_all_beams:  # each beam as the whole text, as the reference prints them
            eos = self.tok.special.eos
            full = [shown_ids(splice(self.ids, self.fill.mask_index, a), self.tok.special, self.causal)
                    for a in answers]
            self.beam_texts = [self.tok.decode(f[:-1] if f and f[-1] == eos and not self.causal else f)
                               for f in full]
        best = answers[0] if answers else []
        text = self.tok.decode(best)
        return best, text[:find_stop(text, self.config.stop)]

    def stop(self, reason: str) -> None:
        """End now (cancelled, interrupted): the current fill's tokens so far are kept as its answer."""
        if self.fill is not None and self.beam is None and self.generated[0]:
            self.end_fill(reason)
        self.finish = reason

    def done(self) -> None:
        self.handle.emit(Done(result_of(self)))


# -- the result -------------------------------------------------------------------------------------
def result_of(job: Job) -> Result:
    """A finished job's result: the filled text, its blanks, and the text in pieces (prompt or answer)."""
    if job.error is not None and not job.blank_ids:
        return Result.failed(job.handle.id, job.error)
    ids, origin = list(job.ids), list(job.origin)
    if not job.causal and ids and ids[-1] == job.tok.special.eos:  # the eos a blank prompt got appended
        ids, origin = ids[:-1], origin[:-1]
    shown = shown_ids(ids, job.tok.special, job.causal)  # without a causal model's [gMASK] sop prefix
    given = job.handle.request.text
    text = job.tok.decode(shown) if given is None else \
        filled_text(given, job.kind, job.tok.special, [a + t for a, t in zip(job.blank_leads, job.blank_texts)])
    return Result(id=job.handle.id, text=text, blanks=list(job.blank_texts),
                  blanks_token_ids=[list(b) for b in job.blank_ids], token_ids=ids,
                  finish_reason=job.finish or "stop", prompt_tokens=job.prompt_tokens,
                  completion_tokens=job.completion_tokens, beams=job.beam_texts, error=job.error,
                  pieces=_pieces(job.tok, shown, origin[len(ids) - len(shown):]), logprobs=job.logprobs,
                  cut_by_max_len=job.cut_by_max_len, leads=list(job.blank_leads))


def _pieces(tok: GLMTokenizer, ids: list[int], origin: list[int]) -> list[tuple[str, bool]]:
    """The text in runs of one origin each: (text, whether an answer wrote it), for highlighting."""
    pieces: list[tuple[str, bool]] = []
    start, shown = 0, ""
    for i in range(1, len(ids) + 1):
        if i == len(ids) or origin[i] != origin[start]:
            text = tok.decode(ids[:i])  # decoding prefixes keeps the spaces between pieces
            pieces.append((text[len(shown):], origin[start] > 0))
            start, shown = i, text
    return pieces
