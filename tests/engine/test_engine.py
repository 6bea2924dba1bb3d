"""The continuous-batching engine on the bundled demo model: a request's tokens do not depend on what runs
beside it; stop strings, finish reasons, logprobs, streamed events, cancellation, admission control and row moves."""
from __future__ import annotations

import math

import pytest

from glm_tp.checkpoints.reshard import rewrite
from glm_tp.dev.demo_corpus import held_out
from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.core import Engine
from glm_tp.engine.types import (
    QUEUE_FULL,
    BlankDone,
    Delta,
    Done,
    GenerationConfig,
    Request,
)
from glm_tp.text.blanks import CONTEXT_LENGTH, INVALID_PROMPT
from tests.support import ROOT
from tests.support.engines import engine_for
from tests.support.ranks import run_ranks

DEMO = ROOT / "glm_tp" / "demo"
REPEAT = "list : drum key dog root elk . again : [gMASK]"  # the demo model answers "drum key dog root elk ."


def _engine(tp=None, ckpt=DEMO, max_batch: int = 8, **kw) -> Engine:
    return engine_for(ckpt, DEMO / "tokenizer.model", tp=tp, default=GenerationConfig(max_new_tokens=16),
                      max_batch=max_batch, **kw)


def _mixed_requests() -> list[Request]:
    """30 requests: [MASK], [sMASK], [gMASK] and two-blank prompts; greedy, seeded sampling and beam search."""
    prompts = [e.prompt for kind in ("recall", "cycle", "repeat", "two") for e in held_out(kind, 6)]
    prompts += [e.prompt.replace("[MASK]", "[sMASK]") for e in held_out("cycle", 6)]
    configs = [GenerationConfig(max_new_tokens=16),
               GenerationConfig(strategy="sample", temperature=0.9, top_k=8, seed=7, max_new_tokens=16, logprobs=3),
               GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=12),
               GenerationConfig(strategy="sample", top_p=0.8, seed=11, max_new_tokens=10, stop=(" .",))]
    return [Request(f"r{i}", p, config=configs[i % len(configs)]) for i, p in enumerate(prompts)]


def _together_and_alone(tp, ckpt):
    engine = _engine(tp, ckpt, max_batch=8)
    requests = _mixed_requests()
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    return [(r.token_ids, r.blanks_token_ids, r.finish_reason) for r in together], \
        [(r.token_ids, r.blanks_token_ids, r.finish_reason) for r in alone]


def test_tokens_do_not_depend_on_what_runs_beside_them_at_tp_1_and_2(tmp_path):
    rewrite(DEMO, tmp_path / "tp2", 2, progress=False)
    together, alone = run_ranks(1, _together_and_alone, DEMO)[0]
    assert together == alone
    assert len({len(t[1]) for t in together}) == 2  # one-blank and two-blank requests both ran
    together2, alone2 = run_ranks(2, _together_and_alone, tmp_path / "tp2")[0]
    assert together2 == alone2 == together


def test_stop_strings_end_a_blank_and_give_the_finish_reason():
    engine = _engine()
    plain, stopped, capped, prompt_only = engine.generate([
        Request("plain", REPEAT), Request("stop", REPEAT, config=GenerationConfig(stop=("root", "zzz"))),
        Request("cap", REPEAT, config=GenerationConfig(max_new_tokens=2)),
        Request("prompt", REPEAT, config=GenerationConfig(stop=("list",))),  # only in the prompt: no effect
    ])
    assert plain.blanks == ["drum key dog root elk ."] and plain.finish_reason == "stop"
    assert stopped.blanks[0].rstrip() == "drum key dog" and stopped.finish_reason == "stop"
    assert stopped.text.rstrip().endswith("again : drum key dog") and stopped.completion_tokens < plain.completion_tokens
    assert capped.finish_reason == "length" and capped.completion_tokens == 2
    assert prompt_only.blanks == plain.blanks
    for r in (plain, stopped, capped):
        assert [engine.tok.decode(ids) for ids in r.blanks_token_ids] == r.blanks


def test_streamed_text_holds_back_a_possible_stop_string_and_adds_up_to_the_blank():
    engine = _engine()
    coordinator = Coordinator(engine.tp, engine)
    events = []
    handle = coordinator.submit(Request("s", REPEAT, config=GenerationConfig(stop=("root",))), events.append)
    while not handle.done:
        coordinator.step()
    deltas = [e for e in events if isinstance(e, Delta)]
    assert isinstance(events[-1], Done) and isinstance(events[-2], BlankDone)
    assert "".join(d.text for d in deltas) == events[-2].text == handle.result().blanks[0]
    assert not any("ro" in d.text for d in deltas)  # "ro" might have begun "root": never sent
    assert len(deltas) == handle.result().completion_tokens  # one event per generated token


def test_logprobs_are_the_chosen_tokens_and_their_top_alternatives():
    engine = _engine()
    greedy, sampled = engine.generate([
        Request("g", REPEAT, config=GenerationConfig(logprobs=5)),
        Request("s", REPEAT, config=GenerationConfig(strategy="sample", temperature=1.5, seed=3, logprobs=20)),
    ])
    assert len(greedy.logprobs) == greedy.completion_tokens
    for lp, token in zip(greedy.logprobs, greedy.blanks_token_ids[0]):
        assert lp.token_id == token and lp.top[0][0] == token and lp.logprob == lp.top[0][2] <= 0
        assert len(lp.top) == 5 and [t[2] for t in lp.top] == sorted((t[2] for t in lp.top), reverse=True)
        assert sum(math.exp(t[2]) for t in lp.top) <= 1 + 1e-5
    assert all(len(lp.top) == 20 for lp in sampled.logprobs)
    stopped = engine.generate([Request("st", REPEAT, config=GenerationConfig(logprobs=0, stop=("root",)))])[0]
    assert [lp.token_id for lp in stopped.logprobs] == stopped.blanks_token_ids[0]  # none for the stop string
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\]"):
        GenerationConfig().updated(logprobs=21)


def test_cancelling_a_request_frees_its_row_at_the_next_step():
    engine = _engine(max_batch=2)
    coordinator = Coordinator(engine.tp, engine)
    long = GenerationConfig(max_new_tokens=30, min_new_tokens=30)
    first, second = (coordinator.submit(Request(i, REPEAT, config=long)) for i in ("a", "b"))
    third = coordinator.submit(Request("c", REPEAT))
    for _ in range(4):
        coordinator.step()
    assert engine.scheduler.running == 2 and len(engine.scheduler.waiting) == 1
    first.cancel()
    coordinator.step()
    assert first.done and first.result().finish_reason == "cancelled"
    assert {job.handle.id for job, _ in engine.scheduler.rows} == {"b", "c"}  # "c" took the freed row
    while not (second.done and third.done):
        coordinator.step()
    assert third.result().blanks == ["drum key dog root elk ."]


def test_admission_control_refuses_what_can_never_fit_and_bounds_the_queue():
    engine = _engine(max_batch=2)
    coordinator = Coordinator(engine.tp, engine, max_waiting=2)
    """A refused request is a handle that is already done with its error and the error's code."""
    long = coordinator.submit(Request("long", REPEAT, config=GenerationConfig(max_new_tokens=engine.max_len)))
    beam = coordinator.submit(Request("beam", REPEAT, config=GenerationConfig(strategy="beam", num_beams=4)))
    handles = [coordinator.submit(Request(str(i), REPEAT)) for i in range(2)]
    full = coordinator.submit(Request("x", REPEAT))
    for handle, code, words in [(long, CONTEXT_LENGTH, "max_len"), (full, QUEUE_FULL, "waiting already"),
                                (beam, INVALID_PROMPT, "num_beams 4 needs more cache rows than batch_size 2")]:
        result = handle.result(timeout=0)
        assert handle.refusal == result.error_code == code and words in result.error
        assert result.finish_reason == "error" and result.completion_tokens == 0
    assert _queue(coordinator.load()) == (2, 0)
    while not all(h.done for h in handles):
        coordinator.step()
    assert _queue(coordinator.load()) == (0, 0)


@pytest.mark.parametrize("request_", [Request("e", ""), Request("w", " \n\t "), Request("t", token_ids=[]),
                                      Request("s", "x \ud800 [MASK]")], ids=["empty", "blank", "no-ids", "surrogate"])
def test_an_empty_prompt_or_one_utf8_cannot_hold_is_refused_not_answered(request_):
    """Nothing to answer is refused instead of made-up text; a lone surrogate that got past a front end is
    refused too (sentencepiece would raise a RuntimeError, which reads as a failed collective)."""
    engine = _engine()
    handle, job = engine.accept(request_)
    result = handle.result(timeout=0)
    assert job is None and result.error_code == INVALID_PROMPT and result.finish_reason == "error"
    assert "empty" in result.error or "lone surrogate" in result.error


def test_plans_move_rows_and_the_cache_stays_consistent():
    """Rows leave out of order (short and long answers mixed), so surviving rows are packed into the holes:
    every answer still equals the one it gets alone (checked on the tokens of the packed rows)."""
    engine = _engine(max_batch=3)
    short = GenerationConfig(max_new_tokens=2)
    requests = [Request("long0", REPEAT), Request("short", REPEAT, config=short), Request("long1", REPEAT),
                Request("short2", REPEAT, config=short), Request("long2", REPEAT)]
    moves = []
    apply = engine.apply
    engine.apply = lambda plan: (moves.extend(plan.moves), apply(plan))[1]
    together = engine.generate(requests)
    assert moves  # rows were packed
    engine.apply = apply
    assert [r.token_ids for r in together] == [engine.generate([r])[0].token_ids for r in requests]


def _queue(load: dict) -> tuple[int, int]:
    """Requests waiting and running, from the coordinator's load (which also carries the engine's stats)."""
    return load["waiting"], load["running"]
