"""The decode path (static step inputs, one reused cache, power-of-two key windows, CUDA graphs) gives
what a plain full forward gives."""
from __future__ import annotations

import pytest
import torch

from glm_tp import load_model
from glm_tp.engine.decoder import Decoder, step_window
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.model.glm import SeqLayout
from tests.support.engines import engine_for
from tests.support.ranks import run_ranks

# Two rows of different lengths, each starting at cache slot 0: a [MASK] fill (positions pinned at the
# mask's index 0) and a [gMASK] fill whose positions count on.
MASK_ROW = ([5, 6, 1000, 8, 2, 1004], [0, 1, 2, 3, 4, 2], 5, 2, 0)    # tokens, positions, bidir, first, counting
GMASK_ROW = ([11, 12, 13, 14, 15, 16, 1001, 1004], list(range(8)), 7, 8, 1)
GENERATED = torch.tensor([[31, 32, 33, 34, 35, 36], [40, 41, 42, 43, 44, 45]])


def _prefill(decoder: Decoder, row: int, spec) -> torch.Tensor:
    tokens, positions, bidir, first, counting = spec
    return decoder.prefill(torch.tensor([tokens]), torch.tensor([positions]), torch.tensor([bidir]),
                           torch.tensor([first]), torch.tensor([counting]), row=row)


def _full_forward(model, spec, generated: list[int]) -> torch.Tensor:
    """Logits after the prompt's last token and after each generated token, from one plain forward."""
    tokens, positions, bidir, first, counting = spec
    steps = len(generated)
    pos = positions + [first + counting * i for i in range(steps)]
    layout = SeqLayout(torch.tensor([0]), torch.tensor([bidir]))
    at = torch.arange(len(tokens) - 1, len(tokens) + steps)[None]
    out = model(torch.tensor([tokens + generated]), torch.tensor([pos]), layout, None, logits_at=at)
    return None if out is None else out[0]


def _decoder_vs_full_forward(tp, ckpt):
    model = load_model(ckpt, tp=tp, progress=False)
    decoder = Decoder(model, max_rows=2, graphs=False)
    n = GENERATED.shape[1]
    with torch.inference_mode():
        stepped = [torch.cat([_prefill(decoder, 0, MASK_ROW), _prefill(decoder, 1, GMASK_ROW)]) if tp.is_first
                   else (_prefill(decoder, 0, MASK_ROW), _prefill(decoder, 1, GMASK_ROW))[0]]
        stepped += [decoder.step(GENERATED[:, i]) for i in range(n - 1)]
        full = [_full_forward(model, spec, GENERATED[i, :n - 1].tolist()) for i, spec in enumerate((MASK_ROW, GMASK_ROW))]
    return None if full[0] is None else (torch.stack(stepped, dim=1), torch.stack(full))


def test_decode_steps_over_rows_of_different_lengths_equal_a_full_forward(tiny_checkpoints):
    for tp in (1, 2):
        stepped, full = run_ranks(tp, _decoder_vs_full_forward, tiny_checkpoints[tp])[0]
        err = (stepped - full).abs().max().item()
        assert err < 1e-4, f"TP={tp}: decode steps differ from the full forward by {err}"


def test_rows_join_move_and_fork_without_changing_their_logits(tiny_checkpoints):
    """A row admitted while another decodes, a row moved to another slot (packing), and a row copied
    (beam fan-out) and reordered (beam parents) all continue as a plain forward of their own tokens."""
    model = load_model(tiny_checkpoints[1], progress=False)
    decoder = Decoder(model, max_rows=3, graphs=False)
    with torch.inference_mode():
        _prefill(decoder, 0, MASK_ROW)
        decoder.step(torch.tensor([31]))
        _prefill(decoder, 1, GMASK_ROW)          # joins while row 0 is one token ahead
        decoder.step(torch.tensor([32, 40]))
        decoder.copy_row(1, 0)                   # row 0 leaves; row 1 is packed into its slot
        decoder.copy_row(0, 1)                   # and forked into row 1 (beam fan-out)
        decoder.step(torch.tensor([41, 50]))
        decoder.reorder([1, 1])                  # both beams continue from row 1
        got = decoder.step(torch.tensor([60, 61]))
        want = [_full_forward(model, GMASK_ROW, [40, 50, t])[-1] for t in (60, 61)]
    assert (got - torch.stack(want)).abs().max().item() < 1e-4


def test_windows_are_powers_of_two_within_the_cache():
    assert [step_window(n, 2048) for n in (1, 64, 65, 200, 1025, 2048)] == [64, 64, 128, 256, 2048, 2048]
    assert step_window(90, 96) == 96


def test_the_engine_reuses_one_cache(tiny_checkpoints, tiny_tokenizer_file):
    engine = engine_for(tiny_checkpoints[1], tiny_tokenizer_file, default=GenerationConfig(max_new_tokens=4), max_batch=4)
    first = engine.generate([Request("a", "the quick [MASK] fox")])[0]
    cache = engine.decoder.cache
    again = engine.generate([Request("b", "one two [MASK]"), Request("c", "the quick [MASK] fox")])
    assert engine.decoder.cache is cache and again[1].token_ids == first.token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: CUDA graphs are checked on a GPU machine")
def test_cuda_graphs_give_the_eager_tokens(tiny_checkpoints, tiny_tokenizer_file):
    prompts = ["the quick [MASK] fox", "one two three [gMASK]", "monday [MASK] wednesday"]
    results = {}
    for graphs in (False, True):
        engine = engine_for(tiny_checkpoints[1], tiny_tokenizer_file, device="cuda", dtype="fp16",
                            default=GenerationConfig(max_new_tokens=12), cuda_graphs=graphs)
        results[graphs] = [r.token_ids for r in engine.generate([Request(str(i), p) for i, p in enumerate(prompts)])]
        assert bool(engine.decoder._graphs) == graphs
    assert results[True] == results[False]
