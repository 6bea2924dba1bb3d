"""The engine on a random 'tiny' model: batching, seeds across TP sizes, interrupts, bad requests."""
from __future__ import annotations

from glm_tp.engine.coordinator import Coordinator, worker_loop
from glm_tp.engine.types import GenerationConfig, Request
from tests.support.engines import engine_for
from tests.support.ranks import run_ranks

PROMPTS = [
    "the quick [MASK] fox",
    "one two three [MASK] five [MASK] seven",
    "monday tuesday",                                 # no mask: [gMASK] appended
    "january february [sMASK] april",
    "tensor parallel ranks [gMASK]",
]


def _batched_and_single(tp, ckpt, tokfile):
    engine = engine_for(ckpt, tokfile, tp=tp, default=GenerationConfig(max_new_tokens=5), max_batch=8)
    together = engine.generate([Request(str(i), p) for i, p in enumerate(PROMPTS)])
    alone = [engine.generate([Request(str(i), p)])[0] for i, p in enumerate(PROMPTS)]
    return together, alone


def test_batched_greedy_equals_one_by_one(tiny_checkpoints, tiny_tokenizer_file):
    together, alone = run_ranks(1, _batched_and_single, tiny_checkpoints[1], tiny_tokenizer_file)[0]
    for a, b in zip(together, alone):
        assert a.error is None and a.token_ids == b.token_ids and a.blanks == b.blanks
    assert len(together[1].blanks) == 2  # both blanks of the two-mask prompt are filled
    assert [r.completion_tokens > 0 for r in together] == [True] * len(PROMPTS)


def _sample(tp, ckpt, tokfile):
    engine = engine_for(ckpt, tokfile, tp=tp)
    configs = [GenerationConfig(strategy="sample", max_new_tokens=6, temperature=1.5, top_p=0.9, seed=s)
               for s in (1, 1, 2)]
    return [r.token_ids for r in engine.generate([Request(str(i), PROMPTS[0], config=c)
                                                  for i, c in enumerate(configs)])]


def test_seeded_sampling_is_reproducible_across_runs_and_tp(tiny_checkpoints, tiny_tokenizer_file):
    first = run_ranks(1, _sample, tiny_checkpoints[1], tiny_tokenizer_file)[0]
    again = run_ranks(1, _sample, tiny_checkpoints[1], tiny_tokenizer_file)[0]
    tp2 = run_ranks(2, _sample, tiny_checkpoints[2], tiny_tokenizer_file)
    assert first == again == tp2[0]
    assert first[0] == first[1]  # same seed, same draw, whatever the batch neighbour
    assert first[0] != first[2]
    assert tp2[1] == tp2[0]  # rank 1 learnt every answer from rank 0's broadcasts


class _StopAfter:
    def __init__(self, polls: int):
        self.polls = polls

    def __call__(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def _interrupted(tp, ckpt, tokfile):
    engine = engine_for(ckpt, tokfile, tp=tp, default=GenerationConfig(max_new_tokens=40))
    if not tp.is_first:
        worker_loop(tp, engine)
        return None
    coordinator = Coordinator(tp, engine)
    # the first step prefills; each later poll precedes one decision: 3 tokens, then the stop
    results = coordinator.generate([Request("a", PROMPTS[1]), Request("b", PROMPTS[2])], interrupt=_StopAfter(4))
    after = coordinator.generate([Request("c", PROMPTS[0], config=GenerationConfig(max_new_tokens=3))])
    coordinator.shutdown()
    return [(r.finish_reason, r.completion_tokens) for r in results], after[0].completion_tokens


def test_interrupt_stops_every_rank_at_the_same_step(tiny_checkpoints, tiny_tokenizer_file):
    per_rank = run_ranks(2, _interrupted, tiny_checkpoints[2], tiny_tokenizer_file)
    results, after = per_rank[0]
    assert [r[0] for r in results] == ["interrupted", "interrupted"]
    assert all(r[1] == 3 for r in results)  # three steps ran before the fourth poll said stop
    assert after == 3  # the ranks are still in step for the next request


def test_bad_requests_get_errors_and_the_rest_run(tiny_checkpoints, tiny_tokenizer_file):
    engine = engine_for(tiny_checkpoints[1], tiny_tokenizer_file, default=GenerationConfig(max_new_tokens=3))
    results = engine.generate([
        Request("long", "one " * 300),
        Request("cfg", PROMPTS[0], config=GenerationConfig(top_k=-1)),
        Request("ids", token_ids=[5, 6, 99999]),
        Request("ok", token_ids=[5, 6, engine.tok.special.mask, 7]),
    ])
    assert "max length 128" in results[0].error and results[0].finish_reason == "error"
    assert "top_k" in results[1].error
    assert "outside the vocabulary" in results[2].error
    assert results[3].error is None and results[3].completion_tokens > 0


def test_prompts_near_the_max_length_run_beside_short_ones(tiny_checkpoints, tiny_tokenizer_file):
    # rows of very different lengths share the decode steps: each stays within the model's positions and
    # the cache, and running beside others changes nothing; a request that cannot fit is refused at once
    engine = engine_for(tiny_checkpoints[1], tiny_tokenizer_file, default=GenerationConfig(max_new_tokens=8))
    gmask, mask = engine.tok.special.gmask, engine.tok.special.mask
    two = GenerationConfig(max_new_tokens=2)
    requests = [Request("long", token_ids=[5] * 124 + [gmask], config=two), Request("short", token_ids=[5, 6, gmask]),
                Request("mid", token_ids=[7] * 60 + [mask, 8]), Request("over", token_ids=[5] * 124 + [gmask])]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.completion_tokens for r in together][:2] == [2, 8]
    assert together[0].finish_reason == "length"
    assert together[3].finish_reason == "error" and "max_len 128" in together[3].error


def test_all_beams_are_returned(tiny_checkpoints, tiny_tokenizer_file):
    engine = engine_for(tiny_checkpoints[1], tiny_tokenizer_file)
    cfg = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=4, return_all_beams=True)
    result = engine.generate([Request("b", PROMPTS[0], config=cfg)])[0]
    assert len(result.beams) == 3 and len(set(result.beams)) == 3 and result.beams[0] == result.text
