"""GLM's mask, one builder for whole sequences, prompts and decode steps, against its definition."""
from __future__ import annotations

import torch

from glm_tp import SeqLayout
from glm_tp.model.masks import glm_mask


def _hidden(query: int, key: int, bidirectional: int, pad: int) -> bool:
    """The definition: pad slots are hidden; a query sees the bidirectional span after them, then causally."""
    return key < pad or not (key < pad + bidirectional or key <= query)


def test_shared_queries_with_padding_follow_the_definition():
    bidirectional, pad = torch.tensor([2, 0, 5]), torch.tensor([1, 3, 0])
    got = glm_mask(torch.arange(4, 9), 10, bidirectional, pad)
    assert got.shape == (3, 1, 5, 10) and got.dtype == torch.bool
    for b in range(3):
        for i, query in enumerate(range(4, 9)):
            for key in range(10):
                assert bool(got[b, 0, i, key]) == _hidden(query, key, int(bidirectional[b]), int(pad[b]))


def test_per_row_queries_give_each_row_its_own_step():
    slots, bidirectional = torch.tensor([[3], [7]]), torch.tensor([5, 2])
    got = glm_mask(slots, 8, bidirectional)
    assert got.shape == (2, 1, 1, 8)
    for b in range(2):
        for key in range(8):
            assert bool(got[b, 0, 0, key]) == _hidden(int(slots[b, 0]), key, int(bidirectional[b]), 0)


def test_seq_layout_mask_is_the_builders():
    layout = SeqLayout(pad=torch.tensor([3, 0]), bidirectional=torch.tensor([6, 9]))
    want = glm_mask(torch.arange(2, 6), 6, layout.bidirectional, layout.pad)
    assert torch.equal(layout.mask(2, 4, 6, torch.device("cpu")), want)
    # no padding: the same as a pad of zeros
    assert torch.equal(glm_mask(torch.arange(6), 6, layout.bidirectional),
                       glm_mask(torch.arange(6), 6, layout.bidirectional, torch.zeros(2, dtype=torch.long)))
