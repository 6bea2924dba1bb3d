"""Pipeline parallelism's rules (parallel/pipeline.py): the stage split, the rank layout, and activations
passed stage to stage between the ranks of the same TP index."""
from __future__ import annotations

import pytest
import torch

from glm_tp.parallel.pipeline import RankLayout, StageSplit, recv, send
from tests.support.ranks import run_ranks


def test_an_even_split_gives_the_remainder_to_the_first_stages():
    assert StageSplit.even(70, 4).sizes() == [18, 18, 17, 17]
    assert list(StageSplit.even(70, 4).layers(2)) == list(range(36, 53))
    assert StageSplit.even(3, 3).sizes() == [1, 1, 1]


def test_the_balanced_split_gives_the_end_stages_fewer_layers_for_their_extra_weights():
    split = StageSplit.balanced(70, 4, layer_bytes=1.0, first_extra=3.0, last_extra=3.0)
    assert split.sizes() == [16, 19, 19, 16] and split.num_layers == 70
    assert max(n + e for n, e in zip(split.sizes(), (3, 0, 0, 3))) == 19  # no split has a smaller peak
    assert StageSplit.balanced(10, 2, 1.0, first_extra=4.0, last_extra=0.0).sizes() == [3, 7]
    assert StageSplit.balanced(5, 1, 1.0, 9.0, 9.0).sizes() == [5]


@pytest.mark.parametrize("sizes, stages", [([3, 0], 2), ([2, 3], 2), ([5], 2), ([1, 1, 1], 3)])
def test_a_bad_split_is_one_line(sizes, stages):
    with pytest.raises(ValueError, match="stage_layers|pipeline_parallel"):
        StageSplit.from_sizes(sizes, 4 if sizes != [1, 1, 1] else 2, stages)


@pytest.mark.parametrize("stages", [0, 5, True, 2.0])
def test_more_stages_than_layers_or_not_a_number_is_refused(stages):
    with pytest.raises(ValueError, match="pipeline_parallel must be a whole number between 1 and the model's 4"):
        StageSplit.even(4, stages)


def test_ranks_are_stage_major_so_a_node_of_tp_ranks_is_one_stage():
    layout = RankLayout.of_world(8, 2)
    assert (layout.tp, layout.pp) == (4, 2)
    assert [layout.stage_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.stage_ranks(1) == [4, 5, 6, 7] and layout.peer(2, 1) == 6 and layout.peer(6, 0) == 2
    with pytest.raises(ValueError, match="6 ranks cannot form 4 pipeline stages"):
        RankLayout.of_world(6, 4)


def _relay(tp, layout: RankLayout) -> list[float]:
    """Each stage adds its stage number to what the previous stage sent; the last stage returns it."""
    stage = layout.stage_of(tp.rank)
    x = torch.full((3,), float(tp.rank % layout.tp)) if stage == 0 else \
        recv(torch.empty(3), layout.peer(tp.rank, stage - 1))
    x = x + stage
    if stage + 1 < layout.pp:
        send(x, layout.peer(tp.rank, stage + 1))
    return x.tolist()


def test_activations_go_stage_to_stage_between_ranks_of_the_same_tp_index():
    layout = RankLayout(tp=2, pp=2)
    out = run_ranks(4, _relay, layout)
    assert out[2] == [1.0] * 3 and out[3] == [2.0] * 3  # TP rank 0 and 1 of stage 1 got their own peer's
