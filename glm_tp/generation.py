"""The generation engine: batched blank filling over a tensor-parallel model.

`Engine.generate` runs on every rank with the same requests. Each round fills the next blank of
every unfinished request: the requests are left-padded into one batch, prefilled once, then decoded
one token per step through the preallocated KV cache. Rank 0 alone chooses tokens (sampling.py) and
broadcasts them with a stop flag, so ranks never depend on identical random streams; at the end of a
round rank 0 broadcasts each request's answer, and every rank splices it into the context.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from .blanks import BlankInput, PromptError, check_length, complete_context, fill_kind, next_blank, splice, \
    tokenize_prompt
from .decode import Decoder
from .model import GLMModel, SeqLayout
from .requests import GenerationConfig, Request, Result
from .sampling import BeamGroup, RowSettings, ban_tokens, choose_tokens
from .tokenizer import GLMTokenizer

CONTINUE, DONE, INTERRUPTED = 0, 1, 2


@dataclass
class _State:
    """One request on its way through its blanks (identical on every rank)."""

    request: Request
    config: GenerationConfig
    ids: list[int] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)   # 0 = prompt token, k = token of blank k
    kind: int = 0
    blank_ids: list[list[int]] = field(default_factory=list)
    prompt_tokens: int = 0
    finish: str = ""
    error: str | None = None
    beams: list[list[int]] | None = None
    generator: torch.Generator | None = None  # rank 0's sampling stream

    @property
    def active(self) -> bool:
        return self.error is None and self.finish in ("", "stop", "length") and self.kind in self.ids


class Engine:
    def __init__(self, model: GLMModel, tokenizer: GLMTokenizer, default: GenerationConfig | None = None,
                 max_batch: int = 8, max_len: int | None = None, cuda_graphs: bool | None = None):
        self.model, self.tok, self.tp = model, tokenizer, model.tp
        self.default = default or GenerationConfig()
        self.max_batch = max_batch
        # the KV cache for max_batch sequences of max_len tokens (default: the model's), reused by every fill
        self.decoder = Decoder(model, max_batch, max_len, graphs=cuda_graphs)
        special = tokenizer.special
        self.end_tokens = [special.eop, special.eos]
        # only text tokens and the end tokens may be generated: never masks, sop or padded rows
        self.banned = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
        lo = tokenizer.offset
        self.banned[lo:min(lo + tokenizer.text_vocab_size, model.cfg.vocab_size)] = False
        self.banned[self.end_tokens] = False
        self._banned_on: dict[torch.device, torch.Tensor] = {}

    def banned_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._banned_on:
            self._banned_on[device] = self.banned.to(device)
        return self._banned_on[device]

    # -- public -----------------------------------------------------------------------------------
    def generate(self, requests: list[Request], interrupt: Callable[[], bool] | None = None) -> list[Result]:
        states = [self._start(r) for r in requests]
        stopped = False
        while not stopped:
            pending = [s for s in states if s.active]
            if not pending:
                break
            for chunk in self._chunks(pending):
                if self._fill(chunk, interrupt) == INTERRUPTED:
                    stopped = True
                    break
        if stopped:
            for s in states:
                if s.active:
                    s.finish = "interrupted"
        return [self._result(s) for s in states]

    # -- preparation ------------------------------------------------------------------------------
    def _start(self, r: Request) -> _State:
        cfg = r.config or self.default
        s = _State(request=r, config=cfg)
        try:
            cfg.validate()
            if r.token_ids is not None:
                bad = [t for t in r.token_ids if not 0 <= int(t) < self.model.cfg.vocab_size]
                if bad:
                    raise PromptError(f"token id {bad[0]} is outside the vocabulary [0, {self.model.cfg.vocab_size})")
                s.ids = complete_context([int(t) for t in r.token_ids], self.tok.special)
            elif r.text is not None:
                s.ids = tokenize_prompt(r.text, self.tok)
            else:
                raise PromptError("request has neither text nor token_ids")
            check_length(s.ids, self.decoder.max_len)
        except ValueError as e:
            s.error = str(e)
            return s
        s.origin = [0] * len(s.ids)
        s.kind = fill_kind(s.ids, self.tok.special)
        s.prompt_tokens = len(s.ids)
        return s

    def _chunks(self, states: list[_State]) -> list[list[_State]]:
        """Requests that share settings (all but the seed) run together, at most max_batch rows. Prompts are
        taken shortest first, and a chunk ends before its longest prompt plus the longest generation it
        allows would overflow the cache (rows are left-padded to the longest prompt)."""
        groups: dict[tuple, list[_State]] = {}
        for s in states:
            groups.setdefault(dataclasses.astuple(dataclasses.replace(s.config, seed=0)), []).append(s)
        limit = self.decoder.max_len
        chunks: list[list[_State]] = []
        for group in groups.values():
            cfg = group[0].config
            per = max(1, self.max_batch // self._beams(cfg))
            chunk: list[_State] = []
            steps = 0  # generation room of the chunk's shortest prompt: the most steps it will run
            for s in sorted(group, key=lambda s: len(s.ids)):
                width = len(s.ids) + 1  # with sop: the widest row so far
                if chunk and (len(chunk) == per or width + steps > limit):
                    chunks.append(chunk)
                    chunk = []
                if not chunk:
                    steps = min(cfg.max_new_tokens, limit - width)
                chunk.append(s)
            if chunk:
                chunks.append(chunk)
        return chunks

    @staticmethod
    def _beams(cfg: GenerationConfig) -> int:
        return cfg.num_beams if cfg.strategy == "beam" else 1

    # -- one blank for a chunk of requests ---------------------------------------------------------
    def _fill(self, chunk: list[_State], interrupt: Callable[[], bool] | None) -> int:
        cfg, model = chunk[0].config, self.model
        k = self._beams(cfg)
        inputs: list[BlankInput] = []
        for s in chunk:
            inp = next_blank(s.ids, s.kind, self.tok.special, model.cfg.position_encoding)
            assert inp is not None
            inputs.append(inp)
        rows = len(chunk) * k
        width = max(len(i.tokens) for i in inputs)
        # a row may generate until it fills the cache (_chunks keeps the padded rows within it too)
        caps = [min(cfg.max_new_tokens, self.decoder.max_len - len(i.tokens)) for i in inputs]
        steps = max(caps)
        row_inputs = [inp for inp in inputs for _ in range(k)]
        row_caps = [c for c in caps for _ in range(k)]
        pad = torch.tensor([width - len(i.tokens) for i in row_inputs])
        tokens = torch.tensor([[self.tok.special.pad] * (width - len(i.tokens)) + i.tokens for i in row_inputs])
        positions = torch.tensor([[i.pad_position] * (width - len(i.tokens)) + i.positions for i in row_inputs])
        layout = SeqLayout(pad=pad, bidirectional=torch.tensor([i.bidirectional for i in row_inputs]))
        first_position = torch.tensor([i.next_position for i in row_inputs])
        counting = torch.tensor([i.counting for i in row_inputs])
        device = model.device
        decider = _Decider(self, chunk, inputs, k, row_caps) if self.tp.is_first else None

        flag = CONTINUE
        with torch.inference_mode():
            logits = self.decoder.prefill(tokens, positions, layout, first_position, counting)
            for step in range(steps):
                message = torch.zeros(2 * rows + 1, dtype=torch.long, device=device)
                if decider is not None:
                    message = decider.step(logits, step, interrupt).to(device)
                self.tp.broadcast(message)
                parents, next_tokens, flag = message[:rows], message[rows:2 * rows], int(message[-1])
                if flag != CONTINUE:
                    break
                if k > 1:
                    self.decoder.reorder(parents)
                logits = self.decoder.step(next_tokens)
        outcome = decider.outcome(flag) if decider is not None else None
        outcome = self.tp.broadcast_object(outcome)
        for s, inp, (answer, finish, beams) in zip(chunk, inputs, outcome):
            number = len(s.blank_ids) + 1
            s.ids = splice(s.ids, inp.mask_index, answer)
            s.origin = s.origin[:inp.mask_index] + [number] * len(answer) + s.origin[inp.mask_index + 1:]
            s.blank_ids.append(answer)
            s.finish = finish
            s.beams = [splice(inp.tokens[:-1], inp.mask_index, b) for b in beams] if beams else None
            if s.active and len(s.ids) + 1 > self.decoder.max_len:
                s.finish = "length"  # no room left for the next blank's sop
                s.error = f"prompt grew to {len(s.ids)} tokens after filling a blank: no room for the next one"
        return flag

    # -- results ----------------------------------------------------------------------------------
    def _result(self, s: _State) -> Result:
        if s.error is not None and not s.blank_ids:
            return Result(id=s.request.id, finish_reason="error", error=s.error)
        ids, origin = list(s.ids), list(s.origin)
        if ids and ids[-1] == self.tok.special.eos:
            ids, origin = ids[:-1], origin[:-1]
        pieces: list[tuple[str, bool]] = []
        start, shown = 0, ""
        for i in range(1, len(ids) + 1):
            if i == len(ids) or origin[i] != origin[start]:
                text = self.tok.decode(ids[:i])  # decoding prefixes keeps the spaces between pieces
                pieces.append((text[len(shown):], origin[start] > 0))
                start, shown = i, text
        beams = None
        if s.beams and s.config.return_all_beams:
            beams = [self.tok.decode(b[:-1] if b and b[-1] == self.tok.special.eos else b) for b in s.beams]
        return Result(id=s.request.id, text=self.tok.decode(ids), blanks=[self.tok.decode(b) for b in s.blank_ids],
                      blanks_token_ids=[list(b) for b in s.blank_ids],
                      token_ids=ids, finish_reason=s.finish or "stop", prompt_tokens=s.prompt_tokens,
                      completion_tokens=sum(len(b) for b in s.blank_ids), beams=beams, error=s.error, pieces=pieces)


class _Decider:
    """Rank 0's side of one fill: chooses tokens, tracks what every row generated, decides when to stop."""

    def __init__(self, engine: Engine, chunk: list[_State], inputs: list[BlankInput], k: int, row_caps: list[int]):
        self.engine, self.chunk, self.k, self.caps = engine, chunk, k, row_caps
        self.cfg = chunk[0].config
        self.rows = len(chunk) * k
        self.generated: list[list[int]] = [[] for _ in range(self.rows)]
        self.ended = [False] * self.rows
        self.length_hit = [False] * self.rows
        self.beams = [BeamGroup(k, self.cfg.length_penalty, prefix=len(i.tokens)) for i in inputs] \
            if self.cfg.strategy == "beam" else None
        for s in chunk:  # one random stream per request, carried from blank to blank
            s.generator = s.generator or torch.Generator().manual_seed(s.config.seed)
        self.settings = [RowSettings(greedy=self.cfg.strategy != "sample", temperature=self.cfg.temperature,
                                     top_k=self.cfg.top_k, top_p=self.cfg.top_p, generator=s.generator)
                         for s in chunk]

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Float logits with the bans applied; greedy stays on the logits' device (only ids come back),
        sampling and beam search run on the host with the requests' CPU generators."""
        out = logits.float() if self.cfg.strategy == "greedy" else logits.float().cpu()
        out.masked_fill_(self.engine.banned_on(out.device)[: out.shape[-1]], float("-inf"))
        return ban_tokens(out, self.generated, self.engine.end_tokens, self.cfg.min_new_tokens,
                          self.cfg.no_repeat_ngram_size)

    def step(self, logits: torch.Tensor, step: int, interrupt: Callable[[], bool] | None) -> torch.Tensor:
        rows, end = self.rows, self.engine.end_tokens
        parents = torch.arange(rows)
        if interrupt is not None and interrupt():  # before choosing: nothing of this step is kept
            return torch.cat([parents, torch.zeros(rows, dtype=torch.long), torch.tensor([INTERRUPTED])])
        scores = self._logits(logits)
        if self.beams is None:
            chosen = choose_tokens(scores, self.settings).cpu()
            for i in range(rows):
                if not self.ended[i]:
                    self.generated[i].append(int(chosen[i]))
                    self.ended[i] = int(chosen[i]) in end
                    if not self.ended[i] and len(self.generated[i]) >= self.caps[i]:
                        self.ended[i] = self.length_hit[i] = True
            tokens = chosen
        else:
            logprobs = scores.log_softmax(dim=-1)
            tokens = torch.full((rows,), end[0], dtype=torch.long)
            for g, group in enumerate(self.beams):
                base = g * self.k
                if group.done:
                    continue
                picks = group.step(logprobs[base:base + self.k], end)
                for j, (parent, token) in enumerate(picks):
                    parents[base + j] = base + parent
                    tokens[base + j] = token
                self.generated[base:base + self.k] = [list(t) for t in group.live]
                if len(group.live[0]) >= self.caps[base]:
                    group.done = True
                    self.length_hit[base] = True
        flag = CONTINUE
        if (self.beams is None and all(self.ended)) or (self.beams is not None and all(b.done for b in self.beams)):
            flag = DONE
        return torch.cat([parents, tokens, torch.tensor([flag])])

    def outcome(self, flag: int) -> list[tuple[list[int], str, list[list[int]] | None]]:
        end = self.engine.end_tokens
        out = []
        for g, s in enumerate(self.chunk):
            if self.beams is not None:
                hyps = self.beams[g].finish()
                answers = [h.tokens[:-1] if h.tokens and h.tokens[-1] in end else h.tokens for h in hyps]
                finish = "stop" if hyps and hyps[0].finished else "length"
                out.append((answers[0] if answers else [], finish, answers if s.config.return_all_beams else None))
                continue
            gen = self.generated[g]
            stopped = bool(gen) and gen[-1] in end
            finish = "stop" if stopped else ("length" if self.length_hit[g] or flag != INTERRUPTED else "interrupted")
            out.append((gen[:-1] if stopped else gen, finish, None))
        return out
