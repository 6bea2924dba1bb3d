"""Several micro-batches in flight across pipeline stages (engine/lanes.py): the queue runs plan t - s at stage
s, the rows split into lanes without growing the cache, and with PP 2 and PP 4 concurrent requests in several
lanes (greedy, beam, seeded sampling, [MASK] and [gMASK] blanks) get the tokens of one rank, also when one of
them is cancelled while the other lane runs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.engine.core import Engine
from glm_tp.engine.lanes import StageQueue, lane_count, lane_rows
from glm_tp.engine.plan import END, StepPlan
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.text.tokenizer import load_tokenizer
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import run_ranks


def test_stage_s_runs_the_plan_of_iteration_t_minus_s_and_a_drain_runs_the_rest():
    plans = [StepPlan(tokens=[t]) for t in range(6)]
    for delay in range(4):
        queue, ran = StageQueue(delay), []
        for t, plan in enumerate(plans):
            due = queue.push(t % 2, plan)
            ran.append([p.tokens[0] for _, p in due])
        assert ran == [[]] * delay + [[t] for t in range(6 - delay)]
        assert [p.tokens[0] for _, p in queue.drain()] == list(range(6 - delay, 6)) and not queue.plans


def test_lanes_split_the_rows_without_growing_the_cache():
    assert lane_count(1, 16, False) == 1 and lane_count(4, 16, True) == 1  # TP alone, prefix cache: in turn
    assert [lane_count(p, 4, False) for p in (2, 4)] == [2, 2] and lane_count(4, 3, False) == 1
    assert lane_count(4, 16, False) == 4 and lane_count(4, 16, False, asked=1) == 1  # pipeline_lanes=1: in turn
    assert lane_count(4, 16, False, asked=2) == 2
    assert lane_rows(7, 3) == [3, 2, 2] and sum(lane_rows(16, 4)) == 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("lanes") / "tiny",
                                   dataclasses.replace(PRESETS["tiny"], num_layers=4), 1, torch.float32)


def _requests() -> list[Request]:
    configs = [GenerationConfig(max_new_tokens=12), GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=6),
               GenerationConfig(strategy="sample", temperature=0.9, top_k=8, seed=7, max_new_tokens=9),
               GenerationConfig(strategy="sample", top_p=0.8, seed=11, max_new_tokens=7)]
    prompts = ["the quick [MASK] fox", "one [sMASK] three [MASK] five", "monday tuesday [gMASK]"]
    return [Request(f"r{i}", prompts[i % 3], config=configs[i % 4]) for i in range(6)]


def _run(tp, ckpt, tokfile, pp: int, cancel_at: int | None):
    """Every request's (tokens, finish reason, error, answer tokens per blank) at batch_size 4, the lanes and
    the most plans with rows in flight at once (rank 0). cancel_at: the engine poll that cancels request 0."""
    model = load_model(ckpt, tp=tp, pipeline_parallel=pp, progress=False)
    engine = Engine(model, load_tokenizer(tokfile, model.cfg.special), max_batch=4)
    if cancel_at is None:
        results = engine.generate(_requests())
    elif not model.world.is_first:
        engine.follow(until=END)
        results = model.world.broadcast_object(None)
    else:
        handles = []
        for request in _requests():
            handle, job = engine.accept(request)
            engine.scheduler.add(job)
            handles.append(handle)
        polls = [0]

        def finished() -> bool:
            polls[0] += 1
            if polls[0] == cancel_at:
                handles[0].cancel()
            return all(h.done for h in handles)

        engine.drive(finished)
        engine.send(END)
        results = model.world.broadcast_object([h.result() for h in handles])
    most = engine.schedule.inflight.most if engine.schedule is not None and model.world.is_first else 0
    return [(r.token_ids, r.finish_reason, r.error, r.blanks_token_ids) for r in results], len(engine.lanes), most


@pytest.mark.parametrize("pp, tp", [(2, 1), (4, 1), (2, 2)])
def test_requests_in_several_lanes_get_the_tokens_of_one_rank(ckpt, tiny_tokenizer_file, pp, tp):
    alone, lanes, _ = run_ranks(1, _run, ckpt, tiny_tokenizer_file, 1, None)[0]
    assert lanes == 1 and all(error is None for _, _, error, _ in alone)
    out = run_ranks(pp * tp, _run, ckpt, tiny_tokenizer_file, pp, None)
    assert all(tokens == alone for tokens, _, _ in out)
    assert out[0][1] == 2 and out[0][2] >= 2  # two lanes, both with plans in flight at once


def test_a_request_cancelled_in_one_lane_leaves_the_other_lane_running(ckpt, tiny_tokenizer_file):
    alone = run_ranks(1, _run, ckpt, tiny_tokenizer_file, 1, None)[0][0]
    out = run_ranks(2, _run, ckpt, tiny_tokenizer_file, 2, 8)
    tokens, _, most = out[0]
    assert out[1][0] == tokens and most >= 2
    (answer,), whole = tokens[0][3], alone[0][3][0]
    assert tokens[0][1] == "cancelled" and len(answer) < len(whole) and answer == whole[:len(answer)]
    assert tokens[1:] == alone[1:]
