"""Choosing the next token on rank 0: greedy, temperature/top-k/top-p sampling, and beam search.

All of it works on a whole batch at once. Rules every strategy shares:
- `min_new_tokens`: end tokens are banned until that many tokens were generated;
- `no_repeat_ngram_size` n: a token that would repeat an n-gram of the generated text is banned;
- one `torch.Generator` per request, seeded with its `seed`, so a request samples the same tokens
  whatever else runs beside it and whatever the TP size (only rank 0 samples).
Beam search is the reference's (GLM-130B BeamSearchStrategy) with deterministic candidates (top-k, as its
evaluation runs it; its generate.py samples them): (1 + number of end tokens) * num_beams candidates a
step, end candidates become finished hypotheses scored sum(log p) / ((5 + length) / 6) ** length_penalty
(GNMT) where length counts the whole beam, context and sop included; a request is done when its worst
kept hypothesis beats the best live beam.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


def ban_tokens(logits: torch.Tensor, rows_generated: list[list[int]], end_tokens: list[int],
               min_new_tokens: int, no_repeat_ngram_size: int) -> torch.Tensor:
    """In place on float logits [rows, V]; rows_generated[i] is what row i generated so far."""
    n = no_repeat_ngram_size
    for i, gen in enumerate(rows_generated):
        if len(gen) < min_new_tokens:
            logits[i, end_tokens] = NEG_INF
        if n > 0 and len(gen) >= n - 1:
            prefix = tuple(gen[len(gen) - n + 1:]) if n > 1 else ()
            banned = [gen[j + n - 1] for j in range(len(gen) - n + 1) if tuple(gen[j:j + n - 1]) == prefix]
            if banned:
                logits[i, banned] = NEG_INF
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-k (0 = off) and nucleus top-p (1.0 = off) on float logits [rows, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).unsqueeze(-1)
    drop = rank >= k
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token: the first token always stays
    drop |= before > top_p.unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sampled_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """The distribution each sampled row draws from, as logits [rows, V]: temperature, then top-k and
    top-p (the sort is skipped when every row has both off). Row-wise only, so a row's result never
    depends on the other rows."""
    out = logits / temperature.clamp(min=1e-5).unsqueeze(-1)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        out = filter_top_k_top_p(out, top_k, top_p)
    return out


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float        # length-penalised
    finished: bool      # ended with an end token (False: stopped by the length limit)


@dataclass
class BeamGroup:
    """The beams of one request; `prefix` is the length of its context with sop (the reference's
    length penalty counts the whole sequence)."""

    num_beams: int
    length_penalty: float
    prefix: int = 0
    live: list[list[int]] = field(default_factory=list)  # tokens of each live beam
    scores: list[float] = field(default_factory=list)    # sum of log-probs of each live beam
    ended: list[Hypothesis] = field(default_factory=list)
    done: bool = False

    def __post_init__(self) -> None:
        self.live = [[] for _ in range(self.num_beams)]
        self.scores = [0.0] + [NEG_INF] * (self.num_beams - 1)  # all beams start equal: expand only one

    def penalised(self, score: float, generated: int) -> float:
        return score / ((5.0 + self.prefix + generated) / 6.0) ** self.length_penalty

    def step(self, logprobs: torch.Tensor, end_tokens: list[int]) -> list[tuple[int, int]]:
        """logprobs [beams, V] (bans applied). Returns (parent beam, token) for the next live beams."""
        k = self.num_beams
        total = torch.tensor(self.scores, dtype=torch.float64).unsqueeze(-1) + logprobs.double()
        values, flat = total.view(-1).topk((max(1, len(end_tokens)) + 1) * k)
        chosen: list[tuple[int, int]] = []
        new_scores: list[float] = []
        for v, f in zip(values.tolist(), flat.tolist()):
            if v == NEG_INF:
                break
            parent, token = divmod(f, logprobs.shape[-1])
            if token in end_tokens:
                tokens = self.live[parent] + [token]
                self.ended.append(Hypothesis(tokens, self.penalised(v, len(tokens)), True))
            elif len(chosen) < k:
                chosen.append((parent, token))
                new_scores.append(v)
            else:
                break
        self.ended.sort(key=lambda h: h.score, reverse=True)
        del self.ended[k:]
        while len(chosen) < k:  # fewer candidates than beams: pad with a dead beam
            chosen.append((0, end_tokens[0]))
            new_scores.append(NEG_INF)
        self.live = [self.live[p] + [t] for p, t in chosen]
        self.scores = new_scores
        best_live = max(self.scores)
        if len(self.ended) >= k and (best_live == NEG_INF or
                                     self.ended[-1].score >= self.penalised(best_live, len(self.live[0]))):
            self.done = True
        return chosen

    def finish(self) -> list[Hypothesis]:
        """Best first; live beams count as unfinished hypotheses when nothing better ended."""
        pool = self.ended + [Hypothesis(t, self.penalised(s, len(t)), False)
                             for t, s in zip(self.live, self.scores) if s != NEG_INF]
        return sorted(pool, key=lambda h: h.score, reverse=True)[:self.num_beams]
