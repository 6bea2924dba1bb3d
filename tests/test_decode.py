"""The decode path (static step inputs, one reused cache, power-of-two key windows, CUDA graphs) gives
what a plain full forward gives."""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from glm_tp import load_model
from glm_tp.decode import Decoder, step_window
from glm_tp.generation import Engine, GenerationConfig, Request
from glm_tp.model import SeqLayout
from glm_tp.tokenizer import load_tokenizer

# Row 0: a [MASK] fill (left-padded by 2, positions pinned at the mask's index 2); row 1: a [gMASK] fill.
PROMPTS = torch.tensor([[0, 0, 5, 6, 1000, 8, 2, 1004],
                        [11, 12, 13, 14, 15, 16, 1001, 1004]])
PAD, BIDIR = torch.tensor([2, 0]), torch.tensor([5, 7])
PROMPT_POS = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
FIRST, COUNTING = torch.tensor([2, 8]), torch.tensor([0, 1])
GENERATED = torch.tensor([[31, 32, 33, 34, 35, 36], [40, 41, 42, 43, 44, 45]])


def _positions_after(steps: int) -> torch.Tensor:
    return FIRST[:, None] + COUNTING[:, None] * torch.arange(steps)[None]


def _decoder_vs_full_forward(tp, ckpt):
    model = load_model(ckpt, tp=tp, progress=False)
    decoder = Decoder(model, max_rows=2, graphs=False)
    layout = SeqLayout(PAD, BIDIR)
    n = GENERATED.shape[1]
    with torch.inference_mode():
        stepped = [decoder.prefill(PROMPTS, PROMPT_POS, layout, FIRST, COUNTING)]
        stepped += [decoder.step(GENERATED[:, i]) for i in range(n - 1)]
        tokens = torch.cat([PROMPTS, GENERATED[:, :n - 1]], dim=1)
        positions = torch.cat([PROMPT_POS, _positions_after(n - 1)], dim=1)
        at = torch.arange(PROMPTS.shape[1] - 1, tokens.shape[1]).expand(2, -1)
        full = model(tokens, positions, layout, None, logits_at=at)
    return None if full is None else (torch.stack(stepped, dim=1), full)


def test_decode_steps_equal_a_full_forward(tiny_checkpoints):
    for tp in (1, 2):
        stepped, full = run_ranks(tp, _decoder_vs_full_forward, tiny_checkpoints[tp])[0]
        err = (stepped - full).abs().max().item()
        assert err < 1e-4, f"TP={tp}: decode steps differ from the full forward by {err}"


def test_beam_reorder_moves_the_cache_rows(tiny_checkpoints):
    model = load_model(tiny_checkpoints[1], progress=False)
    decoder = Decoder(model, max_rows=2, graphs=False)
    same = SeqLayout(torch.tensor([0, 0]), torch.tensor([7, 7]))
    prompts = torch.tensor([[11, 12, 13, 14, 15, 16, 1001, 1004], [21, 22, 23, 24, 25, 26, 1001, 1004]])
    first, counting = torch.tensor([8, 8]), torch.tensor([1, 1])
    with torch.inference_mode():
        decoder.prefill(prompts, PROMPT_POS[1:].expand(2, -1), same, first, counting)
        decoder.step(torch.tensor([40, 50]))
        decoder.reorder(torch.tensor([1, 1]))  # both beams continue from row 1
        got = decoder.step(torch.tensor([60, 61]))
        tokens = torch.cat([prompts[[1, 1]], torch.tensor([[50, 60], [50, 61]])], dim=1)
        want = model(tokens, torch.arange(10).expand(2, -1), same, None)
    assert (got - want).abs().max().item() < 1e-4


def test_windows_are_powers_of_two_within_the_cache():
    assert [step_window(n, 2048) for n in (1, 64, 65, 200, 1025, 2048)] == [64, 64, 128, 256, 2048, 2048]
    assert step_window(90, 96) == 96


def test_the_engine_reuses_one_cache_and_groups_prompts_that_fit(tiny_checkpoints, tiny_tokenizer_file):
    model = load_model(tiny_checkpoints[1], progress=False)
    engine = Engine(model, load_tokenizer(tiny_tokenizer_file, model.cfg.special), GenerationConfig(max_new_tokens=4),
                    max_batch=4)
    first = engine.generate([Request("a", "the quick [MASK] fox")])[0]
    cache = engine.decoder.cache
    again = engine.generate([Request("b", "one two [MASK]"), Request("c", "the quick [MASK] fox")])
    assert engine.decoder.cache is cache and again[1].token_ids == first.token_ids
    # a long prompt and a short one with room to generate cannot share the cache's slots: two chunks
    long_prompt = " ".join(["one two three"] * 12) + " [MASK]"
    big = GenerationConfig(max_new_tokens=model.cfg.max_seq_len)
    states = [engine._start(Request(str(i), p, config=big)) for i, p in enumerate(["a [MASK]", long_prompt])]
    assert [len(c) for c in engine._chunks(states)] == [1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: CUDA graphs are checked on a GPU machine")
def test_cuda_graphs_give_the_eager_tokens(tiny_checkpoints, tiny_tokenizer_file):
    prompts = ["the quick [MASK] fox", "one two three [gMASK]", "monday [MASK] wednesday"]
    results = {}
    for graphs in (False, True):
        model = load_model(tiny_checkpoints[1], device="cuda", dtype="fp16", progress=False)
        engine = Engine(model, load_tokenizer(tiny_tokenizer_file, model.cfg.special),
                        GenerationConfig(max_new_tokens=12), cuda_graphs=graphs)
        results[graphs] = [r.token_ids for r in engine.generate([Request(str(i), p) for i, p in enumerate(prompts)])]
        assert bool(engine.decoder._graphs) == graphs
    assert results[True] == results[False]
