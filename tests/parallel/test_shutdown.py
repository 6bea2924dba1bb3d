"""Leaving the process groups (parallel/dist.py's `shutdown`): the world's and the stages' groups are destroyed
then, while the interpreter is alive, and not left to its teardown, where a gloo worker thread that releases
the last reference to a Python tensor aborts the process ("terminate called without an active exception")."""
from __future__ import annotations

import torch

from glm_tp.parallel.dist import TPContext, shutdown
from glm_tp.parallel.pipeline import StageSplit, init_pipeline
from tests.support.ranks import run_ranks


def _groups_around_shutdown(world: TPContext) -> tuple[tuple[bool, bool], tuple[bool, bool]]:
    stage_tp, _ = init_pipeline(world, 2, StageSplit.even(2, 2))
    world.all_reduce(torch.ones(4))
    stage_tp.all_reduce(torch.ones(4))  # tensors made in Python, released by gloo's threads
    before = (world.group is not None, stage_tp.group is not None)
    shutdown()
    return before, (world.group is None, stage_tp.group is None)


def test_shutdown_destroys_the_world_and_stage_groups_the_contexts_use():
    for before, gone in run_ranks(4, _groups_around_shutdown):
        assert before == (True, True) and gone == (True, True)
