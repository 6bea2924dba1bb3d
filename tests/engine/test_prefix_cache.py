"""Prefix caching (engine/prefix_cache.py): a request's tokens and logprobs are the same with and without a
hit, on a random causal model (multi-turn chat, a shared system prompt, n > 1 copies, beside unrelated rows,
at TP 1 and 2) and on the tiny GLM blank model (only an identical whole context is reused); the prefill
computes only what the cache does not hold; LRU eviction keeps the pool within its budget; ended and
cancelled fills leave no pinned block behind."""
from __future__ import annotations

import pytest

from glm_tp.engine.prefix_cache import BLOCK, PrefixIndex
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.text.blanks import causal_prompt
from tests.support.engines import causal_checkpoint, engine_for
from tests.support.ranks import run_ranks

GREEDY = GenerationConfig(max_new_tokens=10, logprobs=1, min_new_tokens=10)
SAMPLED = GenerationConfig(strategy="sample", temperature=0.9, top_k=20, max_new_tokens=10, logprobs=1,
                           min_new_tokens=10, seed=7)
SYSTEM = "glm fills blanks in the middle of a text and at its end the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("prefix")
    return {tp: causal_checkpoint(root, tp) for tp in (1, 2)}


def _engine(ckpt, tokfile, cache_tokens: int, tp=None, config: GenerationConfig = GREEDY, **kw):
    engine = engine_for(ckpt, tokfile, tp=tp, default=config, max_batch=4, prefix_cache_tokens=cache_tokens, **kw)
    computed = []  # tokens each prefill computes (after a cached prefix)
    prefill = engine.decoder.prefill

    def counting(tokens, *args, lengths=None, **kwargs):
        computed.append(int(lengths.sum()) if lengths is not None else tokens.numel())
        return prefill(tokens, *args, lengths=lengths, **kwargs)

    engine.decoder.prefill = counting
    engine.computed = computed
    return engine


def _same(a, b) -> None:
    """The same results: every token id, and every logprob up to float rounding (a prompt's rest after a
    cached prefix goes through matmuls of other shapes than the whole prompt, so the last bits may differ)."""
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [[t.token_id for t in r.logprobs] for r in a] == [[t.token_id for t in r.logprobs] for r in b]
    got = [t.logprob for r in b for t in r.logprobs]
    assert [t.logprob for r in a for t in r.logprobs] == pytest.approx(got, abs=1e-5)


def _chat(engine, turns: list[str]) -> list:
    """A conversation: each turn resends the history (the previous prompt and its answer) plus a new question."""
    results, history = [], []
    for i, text in enumerate(turns):
        ids = history + (causal_prompt(text, engine.tok) if not history else engine.tok.encode(text))
        results.append(engine.generate([Request(f"turn{i}", token_ids=ids)])[0])
        history = results[-1].token_ids
        # another conversation meanwhile: the rows' slots no longer hold this one's keys and values
        results += engine.generate([Request(f"other{i}", text=f"monday five six {i} seven {text}")])
    return results


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_chats_next_turn_reuses_its_prompt_and_answer_with_the_same_tokens(ckpts, tiny_tokenizer_file, config):
    turns = ["the quick brown fox jumps over the lazy dog", "one two three four five", "monday tuesday"]
    off = _engine(ckpts[1], tiny_tokenizer_file, 0, config=config)
    on = _engine(ckpts[1], tiny_tokenizer_file, 16 * BLOCK, config=config)
    plain, cached = _chat(off, turns), _chat(on, turns)
    _same(plain, cached)
    stats = on.stats()
    # turn 2 holds turn 1's prompt and answer: all of their whole blocks but the last token come from the cache
    history = len(cached[0].token_ids) - 1  # turn 1's answer's last token never reached the cache
    assert stats["prefix_cache_reused_tokens"] >= (history // BLOCK) * BLOCK > 0
    assert sum(off.computed) - sum(on.computed) == stats["prefix_cache_reused_tokens"]
    assert off.stats()["prefix_cache_reused_tokens"] == 0
    assert stats["prefix_cache_hit_rate"] == stats["prefix_cache_reused_tokens"] / stats["prefill_prompt_tokens"]


def _shared_and_copies(engine) -> list:
    """A shared system prompt with different questions, and n = 3 sampled copies of one prompt, each
    batch in one call (so the copies would join one prefill)."""
    questions = ["one two three", "monday", "the lazy dog"]
    shared = engine.generate([Request(f"q{i}", text=f"{SYSTEM} {q}") for i, q in enumerate(questions)])
    copies = engine.generate([Request(f"n{i}", text=f"{SYSTEM} five six", config=SAMPLED.updated(seed=i))
                              for i in range(3)])
    return shared + copies


def test_a_shared_system_prompt_and_n_copies_reuse_the_first_prefill(ckpts, tiny_tokenizer_file):
    off, on = _engine(ckpts[1], tiny_tokenizer_file, 0), _engine(ckpts[1], tiny_tokenizer_file, 16 * BLOCK)
    plain, cached = _shared_and_copies(off), _shared_and_copies(on)
    _same(plain, cached)
    system_blocks = len(causal_prompt(SYSTEM, on.tok)) // BLOCK
    assert system_blocks >= 2
    # the two later questions and all three copies start from the system prompt's blocks (at least)
    assert on.stats()["prefix_cache_reused_tokens"] >= 5 * system_blocks * BLOCK
    assert sum(off.computed) - sum(on.computed) == on.stats()["prefix_cache_reused_tokens"]


def test_a_hit_beside_unrelated_rows_in_one_prefill_and_beside_decoding_rows(ckpts, tiny_tokenizer_file):
    def run(engine):
        first = engine.generate([Request("a", text=SYSTEM + " one two")])
        engine.generate([Request("x", text="five six seven " + SYSTEM)])  # the rows hold something else
        hit_and_miss = engine.generate([Request("b", text=SYSTEM + " monday"), Request("c", text="five six seven"),
                                        Request("d", text="the fox", config=GREEDY.updated(max_new_tokens=30,
                                                                                           min_new_tokens=30))])
        return first + hit_and_miss
    off, on = _engine(ckpts[1], tiny_tokenizer_file, 0), _engine(ckpts[1], tiny_tokenizer_file, 16 * BLOCK)
    _same(run(off), run(on))
    assert on.stats()["prefix_cache_reused_tokens"] >= 2 * BLOCK


def _tp2_chat(tp, ckpt, tokfile, cache_tokens):
    engine = _engine(ckpt, tokfile, cache_tokens, tp=tp)
    results = _chat(engine, ["the quick brown fox jumps over the lazy dog", "one two three four five"])
    return results, engine.stats() if tp.is_first else None


def test_tp2_chat_turns_hit_with_the_same_tokens(ckpts, tiny_tokenizer_file):
    off = run_ranks(2, _tp2_chat, ckpts[2], tiny_tokenizer_file, 0)
    on = run_ranks(2, _tp2_chat, ckpts[2], tiny_tokenizer_file, 16 * BLOCK)
    _same(off[0][0], on[0][0])
    _same(on[0][0], on[1][0])  # every rank returns rank 0's results
    assert on[0][1]["prefix_cache_reused_tokens"] >= BLOCK


def test_lru_eviction_keeps_the_pool_within_its_budget_and_answers_stay_right(ckpts, tiny_tokenizer_file):
    texts = [f"{SYSTEM} {w}" for w in ("one", "two", "three")] + [f"monday {SYSTEM}", SYSTEM + " one"]
    off, on = _engine(ckpts[1], tiny_tokenizer_file, 0), _engine(ckpts[1], tiny_tokenizer_file, 3 * BLOCK)
    index = on.scheduler.prefix
    plain, cached = [], []
    for i, text in enumerate(texts):
        plain += off.generate([Request(str(i), text=text)])
        cached += on.generate([Request(str(i), text=text)])
        assert index.used <= index.blocks == 3
        assert len(index.keys) == index.used and len(index.free) + index.used == 3
    _same(plain, cached)
    assert not any(index.pins)


def test_the_pool_does_not_grow_per_request_and_cancelled_fills_unpin(ckpts, tiny_tokenizer_file):
    engine = _engine(ckpts[1], tiny_tokenizer_file, 16 * BLOCK)
    index = engine.scheduler.prefix
    engine.generate([Request("warm", text=SYSTEM)])
    used = index.used
    for i in range(3):  # the same prompt again: its blocks are found, none added
        engine.generate([Request(str(i), text=SYSTEM)])
        assert index.used == used
    handle, job = engine.accept(Request("cancel", text=SYSTEM + " one two"))
    engine.scheduler.add(job)
    steps = []

    def finished() -> bool:
        steps.append(1)
        if len(steps) == 3:
            assert any(index.pins)  # the running fill holds the blocks it started from
            handle.cancel()
        return handle.done
    engine.drive(finished)
    assert handle.result().finish_reason == "cancelled"
    assert not any(index.pins)
    assert engine.stats()["prefix_cache_reused_tokens"] > 0


def test_blocks_in_use_are_never_evicted():
    index = PrefixIndex(2, block=2)
    first = index.save(None, [1, 2, 3, 4], [0, 1, 2, 3])
    assert [n for n, _ in first] == [0, 1]
    held = index.match(None, [1, 2, 3, 4, 5], [0, 1, 2, 3, 4])
    index.admit(held)
    assert index.save(None, [7, 8, 9, 10], [0, 1, 2, 3]) == []  # every block is pinned: nothing saved
    assert index.match(None, [1, 2, 3, 4, 5], [0, 1, 2, 3, 4]) == held
    index.release(held)
    assert len(index.save(None, [7, 8], [0, 1])) == 1  # now the least recently used leaf goes
    assert index.match(None, [1, 2, 3, 4, 5], [0, 1, 2, 3, 4]) == held[:1]  # the parent outlived its child


def _blank_runs(engine) -> list:
    context = f"{SYSTEM} [gMASK]"
    copies = engine.generate([Request(f"n{i}", text=context, config=SAMPLED.updated(seed=i)) for i in range(3)])
    other = engine.generate([Request("other", text=f"{SYSTEM} monday [gMASK]", config=SAMPLED)])
    two_blanks = engine.generate([Request("two", text="the quick [MASK] fox jumps over the lazy [MASK]",
                                          config=GREEDY)])
    return copies + other + two_blanks


def test_glm_blank_model_reuses_only_an_identical_whole_context(tiny_checkpoints, tiny_tokenizer_file):
    off = _engine(tiny_checkpoints[1], tiny_tokenizer_file, 0)
    on = _engine(tiny_checkpoints[1], tiny_tokenizer_file, 16 * BLOCK)
    plain = _blank_runs(off)
    copies = on.generate([Request(f"n{i}", text=f"{SYSTEM} [gMASK]", config=SAMPLED.updated(seed=i))
                          for i in range(3)])
    reused = on.stats()["prefix_cache_reused_tokens"]
    fill = on.accept(Request("x", text=f"{SYSTEM} [gMASK]"))[1].next_input()  # the context, then sop
    assert len(fill.tokens) == fill.bidirectional + 1
    # the two later copies: the context's whole blocks (the last token, sop, is always computed)
    assert reused == 2 * (fill.bidirectional // BLOCK) * BLOCK > 0
    rest = on.generate([Request("other", text=f"{SYSTEM} monday [gMASK]", config=SAMPLED)])
    rest += on.generate([Request("two", text="the quick [MASK] fox jumps over the lazy [MASK]", config=GREEDY)])
    # a context that only starts like the first shares nothing; nor do one prompt's two blanks
    assert on.stats()["prefix_cache_reused_tokens"] == reused
    _same(plain, copies + rest)


def test_the_setting_is_checked_and_the_memory_plan_counts_the_pool():
    from omegaconf import OmegaConf

    from glm_tp.cli.planner import Plan, with_prefix_cache
    from glm_tp.cli.settings import CONFIG_DIR, UsageError, check_config
    from glm_tp.config import PRESETS

    cfg = OmegaConf.load(CONFIG_DIR / "generate.yaml")
    for bad in (-1, 1.5, "many", True):
        cfg.prefix_cache_tokens = bad
        with pytest.raises(UsageError, match="^prefix_cache_tokens="):
            check_config(cfg)
    for good in (None, 0, 4096):
        cfg.prefix_cache_tokens = good
        check_config(cfg)
    causal = Plan(PRESETS["chatglm2-6b"], 1, 2, 0, 2, 1024)
    auto = with_prefix_cache(causal, None, None)
    assert auto.prefix_tokens == 2 * 1024 and auto.prefix_bytes == causal.kv_bytes  # as large as the KV cache
    assert auto.total_bytes == causal.total_bytes + causal.kv_bytes
    assert with_prefix_cache(causal, None, causal.total_bytes).prefix_tokens == 0  # no room: off
    assert with_prefix_cache(causal, 0, None).prefix_tokens == 0
    assert with_prefix_cache(causal, BLOCK + 3, None).prefix_bytes == causal.kv_bytes // (2 * 1024) * BLOCK
    assert with_prefix_cache(Plan(PRESETS["glm-130b"], 8, 2, 0, 1, 2048), None, None).prefix_tokens == 0
    staged = Plan(PRESETS["chatglm2-6b"], 1, 2, 0, 4, 1024, "cpu", 2)  # two stages: lanes, not the pool
    assert with_prefix_cache(staged, None, None).prefix_tokens == 0
    assert with_prefix_cache(staged, 4096, None).prefix_tokens == 4096  # asked for: one lane, with the cache


def test_the_hit_rate_reaches_the_servers_metrics(ckpts, tiny_tokenizer_file):
    from glm_tp.engine.coordinator import Coordinator
    from glm_tp.server.metrics import Metrics

    engine = _engine(ckpts[1], tiny_tokenizer_file, 16 * BLOCK)
    coordinator = Coordinator(engine.tp, engine)
    coordinator.generate([Request("a", text=SYSTEM)])
    coordinator.generate([Request("b", text=SYSTEM + " one")])
    stats = engine.stats()
    assert 0 < stats["prefix_cache_hit_rate"] < 1
    text = Metrics(coordinator.load).render().decode()
    assert f"glm_tp_prefix_cache_hit_rate {stats['prefix_cache_hit_rate']}" in text
    assert f"glm_tp_prefix_cache_reused_tokens {float(stats['prefix_cache_reused_tokens'])}" in text


def test_beam_search_after_a_cached_prompt_gives_the_same_beams(ckpts, tiny_tokenizer_file):
    beam = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=6, return_all_beams=True)

    def run(engine):
        return engine.generate([Request("a", text=SYSTEM + " one", config=beam)]) + \
            engine.generate([Request("b", text=SYSTEM + " two", config=beam)])
    off, on = _engine(ckpts[1], tiny_tokenizer_file, 0), _engine(ckpts[1], tiny_tokenizer_file, 16 * BLOCK)
    plain, cached = run(off), run(on)
    assert [(r.token_ids, r.beams) for r in plain] == [(r.token_ids, r.beams) for r in cached]
    assert on.stats()["prefix_cache_reused_tokens"] >= 2 * BLOCK
    assert not any(on.scheduler.prefix.pins)


class _Breaks:
    """A constraint that allows anything until it fails on the request's third token."""

    def __init__(self):
        self.at = 0

    def mask(self):
        if self.at == 2:
            raise RuntimeError("the grammar broke")
        return None

    def advance(self, token: int) -> None:
        self.at += 1

    def can_end(self) -> bool:
        return True

    def finished(self) -> bool:
        return False


def test_a_failed_request_unpins_its_blocks_and_keeps_what_it_computed(ckpts, tiny_tokenizer_file):
    off, on = _engine(ckpts[1], tiny_tokenizer_file, 0), _engine(ckpts[1], tiny_tokenizer_file, 16 * BLOCK)
    index = on.scheduler.prefix
    on.generate([Request("warm", text=SYSTEM)])
    broken = on.generate([Request("broken", text=SYSTEM + " one two three four", constraint=_Breaks)])[0]
    assert broken.finish_reason == "error" and "the grammar broke" in broken.error
    assert not any(index.pins) and index.used <= index.blocks
    reused = on.stats()["prefix_cache_reused_tokens"]
    # the failed request's prompt blocks stay cached and are right: the same request again hits them
    again = on.generate([Request("again", text=SYSTEM + " one two three four")])
    assert on.stats()["prefix_cache_reused_tokens"] - reused == \
        (len(causal_prompt(SYSTEM + " one two three four", on.tok)) - 1) // BLOCK * BLOCK
    _same(off.generate([Request("again", text=SYSTEM + " one two three four")]), again)


def test_chatglm_6b_2d_positions_copies_and_a_retry_reuse_the_context(tmp_path, tiny_tokenizer_file):
    import torch

    from glm_tp.config import PRESETS
    from tests.support.checkpoints import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "tiny-chatglm", PRESETS["tiny-chatglm"], 1, torch.float32)
    text = f"{SYSTEM} [MASK] five"

    def run(engine):
        copies = engine.generate([Request(f"n{i}", text=text, config=SAMPLED.updated(seed=i)) for i in range(2)])
        return copies + engine.generate([Request("retry", text=text, config=SAMPLED)])
    off, on = _engine(ckpt, tiny_tokenizer_file, 0), _engine(ckpt, tiny_tokenizer_file, 16 * BLOCK)
    _same(run(off), run(on))
    fill = on.accept(Request("x", text=text))[1].next_input()
    assert isinstance(fill.positions[0], tuple)  # (position, block position)
    assert on.stats()["prefix_cache_reused_tokens"] == 2 * (fill.bidirectional // BLOCK) * BLOCK > 0
