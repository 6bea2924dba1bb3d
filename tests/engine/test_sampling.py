"""Strategies on crafted cases: a fake model whose next-token logits depend only on the last token."""
from __future__ import annotations

import math

import pytest
import torch

from glm_tp.config import PRESETS
from glm_tp.engine.core import Engine
from glm_tp.engine.sampling import BeamGroup, filter_top_k_top_p
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.model.glm import KVCache
from glm_tp.parallel.dist import single_process
from tests.support.engines import engine_for

CFG = PRESETS["tiny"]
SOP, EOP = CFG.special.sop, CFG.special.eop


class MarkovModel:
    """Logits for the next token = table[last token] (the KV cache plays no part)."""

    def __init__(self, transitions: dict[int, dict[int, float]]):
        self.cfg, self.tp, self.device = CFG, single_process(), torch.device("cpu")
        self.world = self.tp  # every rank the engine broadcasts to: this one
        self.stage = None  # no pipeline stages
        self.table = torch.full((CFG.vocab_size, CFG.vocab_size), -1e4)
        for src, dsts in transitions.items():
            for dst, p in dsts.items():
                self.table[src, dst] = math.log(p)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(CFG, 1, batch, max_len, torch.float32, "cpu")

    def __call__(self, tokens, positions, layout, cache, start=0, logits_at=None):
        return self.table[tokens[:, -1]]

    def run(self, tokens, positions, mask, cache, slots, window, logits_at=None):
        last = tokens[:, -1] if logits_at is None else tokens[torch.arange(tokens.shape[0]), logits_at]
        return self.table[last]


@pytest.fixture()
def markov_engine(tiny_tokenizer_file):
    return lambda transitions: engine_for(MarkovModel(transitions), tiny_tokenizer_file)


def _answer(engine: Engine, **settings) -> list[int]:
    cfg = GenerationConfig(max_new_tokens=6).updated(**settings)
    result = engine.generate([Request("r", token_ids=[20, 21, CFG.special.mask], config=cfg)])[0]
    assert result.error is None
    return result.token_ids[2:2 + result.completion_tokens]


def test_beam_of_one_equals_greedy(markov_engine):
    engine = markov_engine({SOP: {10: 0.5, 11: 0.3, EOP: 0.2}, 10: {12: 0.6, EOP: 0.4}, 11: {EOP: 1.0},
                         12: {13: 0.7, EOP: 0.3}, 13: {EOP: 1.0}})
    assert _answer(engine, strategy="greedy") == _answer(engine, strategy="beam", num_beams=1) == [10, 12, 13]


def test_length_penalty_favours_longer_answers(markov_engine):
    # ending at once: log 0.5 = -0.69; [10, 11, eop]: log 0.5 + log 0.9 = -0.80. The reference's penalty
    # divides by ((5 + length) / 6) ** lp with the length of the whole beam (5 prompt tokens with sop here):
    # at lp 2, -0.69 / 3.36 = -0.21 loses to -0.80 / 4.69 = -0.17
    engine = markov_engine({SOP: {EOP: 0.5, 10: 0.5}, 10: {EOP: 0.1, 11: 0.9}, 11: {EOP: 1.0}})
    assert _answer(engine, strategy="beam", num_beams=2, length_penalty=0.0) == []
    assert _answer(engine, strategy="beam", num_beams=2, length_penalty=2.0) == [10, 11]


def test_beam_search_keeps_every_beam_alive_when_end_tokens_lead():
    # 4 live beams whose two end tokens lead: the reference's 3 * num_beams candidates leave room for the
    # 8 end candidates and 4 continuations (2 * num_beams + 2 would kill two beams)
    group = BeamGroup(num_beams=4, length_penalty=1.0, prefix=5)
    group.live, group.scores = [[10], [11], [12], [13]], [-1.0, -1.1, -1.2, -1.3]
    logprobs = torch.full((4, CFG.vocab_size), -50.0)
    logprobs[:, [EOP, 2]] = math.log(0.45)
    logprobs[torch.arange(4), torch.arange(20, 24)] = math.log(0.1)
    chosen = group.step(logprobs, [EOP, 2])
    assert chosen == [(0, 20), (1, 21), (2, 22), (3, 23)] and all(math.isfinite(v) for v in group.scores)
    assert len(group.ended) == 4  # the best end candidates are kept too


def test_no_repeat_ngram_and_min_new_tokens(markov_engine):
    engine = markov_engine({SOP: {10: 0.9, EOP: 0.1}, 10: {10: 0.6, 11: 0.3, EOP: 0.1}, 11: {10: 0.7, EOP: 0.3}})
    assert _answer(engine, strategy="greedy") == [10] * 6
    no_repeat = _answer(engine, strategy="greedy", no_repeat_ngram_size=2)
    bigrams = list(zip(no_repeat, no_repeat[1:]))
    assert len(bigrams) == len(set(bigrams)) and no_repeat[:3] == [10, 10, 11]
    for strategy in ("greedy", "beam"):
        engine = markov_engine({SOP: {EOP: 0.9, 10: 0.1}, 10: {EOP: 0.9, 11: 0.1}, 11: {EOP: 0.9, 12: 0.1}, 12: {EOP: 1.0}})
        assert _answer(engine, strategy=strategy) == []
        assert _answer(engine, strategy=strategy, min_new_tokens=2) == [10, 11]


def test_top_k_and_top_p_filter_each_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.6]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]  # top-2
    assert kept[1].tolist() == [True, True, True, False]   # 0.25 + 0.25 < 0.6, so a third token is needed


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationConfig().updated(top_p=0)
    with pytest.raises(ValueError, match="unknown generation setting 'beams'"):
        GenerationConfig().updated(beams=3)
