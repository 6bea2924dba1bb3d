"""The sampler on its own: crafted logits for the rows of a few jobs, no scheduler and no engine."""
from __future__ import annotations

import pytest
import torch

from glm_tp.config import PRESETS
from glm_tp.engine.jobs import Job
from glm_tp.engine.sampler import Sampler, banned_tokens
from glm_tp.engine.types import GenerationConfig, Request, RequestHandle
from glm_tp.text.tokenizer import load_tokenizer

CFG = PRESETS["tiny"]
S = CFG.special


@pytest.fixture()
def tok(tiny_tokenizer_file):
    return load_tokenizer(tiny_tokenizer_file, S)


def _job(tok, rows: list[int], **settings) -> Job:
    """A job whose first fill has begun on `rows`."""
    cfg = GenerationConfig(max_new_tokens=4).updated(**settings)
    job = Job(RequestHandle(Request("r", token_ids=[20, 21, S.mask], config=cfg)), GenerationConfig(), tok,
              CFG.vocab_size, CFG.max_seq_len)
    job.start_fill()
    job.rows = rows
    return job


def _sampler(tok) -> Sampler:
    return Sampler(banned_tokens(CFG.vocab_size, tok), tok.decode)


def test_banned_tokens_leave_text_and_end_tokens(tok):
    banned = banned_tokens(CFG.vocab_size, tok)
    assert not banned[[S.eop, S.eos, tok.offset, tok.offset + tok.text_vocab_size - 1]].any()
    assert banned[[S.mask, S.gmask, S.sop]].all()


def test_each_row_by_its_own_request(tok):
    greedy, logged = _job(tok, [0]), _job(tok, [2], logprobs=2)
    beams = _job(tok, [1, 3], strategy="beam", num_beams=2)
    logits = torch.full((4, CFG.vocab_size), -10.0)
    logits[0, S.mask] = 10.0  # banned: never chosen however likely
    logits[0, 30] = 5.0
    logits[[1, 3], 40], logits[[1, 3], 41] = 4.0, 3.0
    logits[2, 50], logits[2, 51] = 2.0, 1.0
    choice = _sampler(tok).choose([greedy, beams, logged], logits)
    assert choice.tokens[0] == 30 and choice.tokens[2] == 50
    assert sorted([choice.tokens[1], choice.tokens[3]]) == [40, 41]
    assert set(choice.parents) == {1, 3} and set(choice.parents.values()) <= {1, 3}
    assert greedy.generated == [[30]] and logged.generated == [[50]] and not choice.ended
    entry = logged.logprobs[0]
    assert entry.token_id == 50 and entry.token == tok.decode([50]) and entry.logprob < 0
    assert [alt[0] for alt in entry.top] == [50, 51]


def test_an_end_token_or_the_cap_ends_the_fill(tok):
    ends, capped = _job(tok, [0]), _job(tok, [1], max_new_tokens=1)
    logits = torch.full((2, CFG.vocab_size), -10.0)
    logits[0, S.eop] = 5.0
    logits[1, 30] = 5.0
    choice = _sampler(tok).choose([ends, capped], logits)
    assert choice.ended == [(ends, "stop"), (capped, "length")]
    assert choice.tokens == {0: S.eop, 1: 30}


def test_seeded_sampling_repeats(tok):
    logits = torch.zeros(1, CFG.vocab_size)
    runs = []
    for _ in range(2):
        job = _job(tok, [0], strategy="sample", seed=7, temperature=1.0)
        runs.append([_sampler(tok).choose([job], logits).tokens[0] for _ in range(3)])
    assert runs[0] == runs[1]


def _poisoned(monkeypatch, temperature: float) -> None:
    """Sampling fails for any batch holding a row of this temperature, as a kernel might for one row's values."""
    import glm_tp.engine.sampler as sampler_module
    real = sampler_module.sampled_logits

    def sampled_logits(logits, temperatures, top_k, top_p):
        if bool((temperatures == temperature).any()):
            raise RuntimeError("kernel failed for this row")
        return real(logits, temperatures, top_k, top_p)
    monkeypatch.setattr(sampler_module, "sampled_logits", sampled_logits)


def test_what_fails_for_one_request_ends_that_request_only(tok, monkeypatch):
    logits = torch.randn(4, CFG.vocab_size, generator=torch.Generator().manual_seed(0))
    logits[:, [S.eop, S.eos]] = float("-inf")  # no row ends by choosing an end token: only the poisoned one ends
    jobs = lambda: [_job(tok, [0]), _job(tok, [1], strategy="sample", seed=5, temperature=0.5),  # noqa: E731
                    _job(tok, [2], strategy="sample", seed=6, temperature=0.8), _job(tok, [3], logprobs=1)]
    clean = _sampler(tok).choose(jobs(), logits)
    _poisoned(monkeypatch, 0.5)
    hit = jobs()
    choice = _sampler(tok).choose(hit, logits)
    assert choice.ended == [(hit[1], "error")] and "kernel failed for this row" in hit[1].error
    assert choice.tokens == {r: t for r, t in clean.tokens.items() if r != 1}
    assert [j.generated for j in hit[:1] + hit[2:]] == [[[clean.tokens[r]]] for r in (0, 2, 3)]


def test_a_listener_that_fails_ends_its_request_only(tok):
    def broken(event):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    good, bad = _job(tok, [0], strategy="sample", seed=1), _job(tok, [1], strategy="sample", seed=1)
    bad.handle._listener = broken
    choice = _sampler(tok).choose([good, bad], torch.zeros(2, CFG.vocab_size))
    assert choice.ended == [(bad, "error")] and 0 in choice.tokens and 1 not in choice.tokens
