"""The scheduler and the plan's encoding on their own: rows, queue and admission without a model."""
from __future__ import annotations

import pytest
import torch

from glm_tp.config import PRESETS
from glm_tp.engine.jobs import Job
from glm_tp.engine.plan import (
    STEP,
    Admission,
    Choice,
    StepPlan,
    decode_plan,
    encode_plan,
)
from glm_tp.engine.scheduler import Scheduler
from glm_tp.engine.types import GenerationConfig, Request, RequestHandle
from glm_tp.text.tokenizer import load_tokenizer

CFG = PRESETS["tiny"]
S = CFG.special


@pytest.fixture()
def new_job(tiny_tokenizer_file):
    tok = load_tokenizer(tiny_tokenizer_file, S)

    def make(name: str) -> Job:
        request = Request(name, token_ids=[20, 21, S.mask], config=GenerationConfig(max_new_tokens=4))
        return Job(RequestHandle(request), GenerationConfig(), tok, CFG.vocab_size, CFG.max_seq_len)
    return make


def test_rows_are_freed_packed_and_refilled(new_job):
    sched = Scheduler(max_rows=2, prefill_budget=64)
    a, b, c = new_job("a"), new_job("b"), new_job("c")
    for job in (a, b, c):
        sched.add(job)
    plan = sched.decide([], Choice())
    assert [adm.row for adm in plan.admit] == [0, 1] and a.rows == [0] and b.rows == [1]
    assert list(sched.waiting) == [c] and sched.running == 2
    # "a" ends: "b" moves into row 0 with its token, and "c" takes row 1
    plan = sched.decide([], Choice(tokens={0: S.eop, 1: 30}, ended=[(a, "stop")]))
    assert plan.parents == [0, 1] and plan.moves == [(1, 0)] and plan.tokens == [30]
    assert [adm.row for adm in plan.admit] == [1] and b.rows == [0] and c.rows == [1]
    assert a.handle.done and all(job is not a for job, _ in sched.rows)


def test_cancelled_requests_leave_rows_and_queue(new_job):
    sched = Scheduler(max_rows=1, prefill_budget=64)
    a, b = new_job("a"), new_job("b")
    sched.add(a)
    sched.add(b)
    sched.decide([], Choice())
    a.handle.cancel()
    b.handle.cancel()
    cancelled = sched.cancelled()
    assert cancelled == [(a, "cancelled"), (b, "cancelled")] and not sched.waiting
    plan = sched.decide(cancelled, Choice())
    assert plan.tokens == [] and not plan.admit and not sched.busy
    assert a.handle.result().finish_reason == b.handle.result().finish_reason == "cancelled"


def test_plan_tensor_round_trip():
    plan = StepPlan(parents=[0, 0, 2], moves=[(2, 1)], tokens=[5, 6],
                    admit=[Admission([1, 2], [0, 1], 2, 2, 1, row=2)])
    message = encode_plan(STEP, plan, max_rows=4)
    assert int(message[0]) == STEP and message.dtype == torch.long
    back, extra = decode_plan(message, max_rows=4)
    assert (back.parents, back.tokens, extra) == ([0, 0, 2], [5, 6], True)
    assert not decode_plan(encode_plan(STEP, StepPlan(parents=[0], tokens=[3]), 4), 4)[1]
