"""The engine on a causal model (a random 'tiny-chatglm2': ChatGLM2/3 and GLM-4's architecture): prompts are
[gMASK] sop + the text, causal throughout; greedy tokens equal greedy decoding of the whole sequence with no
cache; the same tokens alone, in a mixed batch and at TP 2; streaming, stop strings, stop ids, logprobs and
cancellation."""
from __future__ import annotations

import pytest
import torch

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.jobs import Job
from glm_tp.engine.sampler import Sampler, banned_tokens
from glm_tp.engine.types import BlankDone, Delta, Done, GenerationConfig, Request, RequestHandle
from glm_tp.model.glm import SeqLayout
from glm_tp.text.blanks import INVALID_PROMPT, causal_fill, causal_prompt, join_answer, splice
from glm_tp.text.tokenizer import load_tokenizer
from tests.support.engines import causal_checkpoint, engine_for
from tests.support.ranks import run_ranks

CFG = PRESETS["tiny-chatglm2"]
S = CFG.special
PROMPTS = ["the quick brown fox", "one two three four five six", "monday",
           "glm fills blanks in the middle of a text and at its end"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("causal")
    return {tp: causal_checkpoint(root, tp) for tp in (1, 2)}


def _engine(ckpt, tokfile, tp=None, max_batch: int = 8, **kw):
    return engine_for(ckpt, tokfile, tp=tp, default=GenerationConfig(max_new_tokens=8), max_batch=max_batch, **kw)


def _allowed(tok, stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """What may be generated, built here on its own: text ids, eos, eop and the model's stop ids."""
    allowed = torch.zeros(CFG.vocab_size, dtype=torch.bool)
    allowed[:tok.text_vocab_size] = True
    allowed[[S.eos, S.eop, *stop_ids]] = True
    return allowed


def _whole_sequence_greedy(model, ids: list[int], steps: int, allowed: torch.Tensor,
                           ends: tuple[int, ...]) -> tuple[list[int], list[float]]:
    """Greedy decoding with the model run on the whole sequence every step (no cache, causal mask,
    positions 0..n-1): the answer's tokens and each one's log-probability among the allowed tokens."""
    seq, answer, logprobs = list(ids), [], []
    with torch.inference_mode():
        for _ in range(steps):
            s = len(seq)
            out = model(torch.tensor([seq]), torch.tensor([list(range(s))]),
                        SeqLayout(torch.tensor([0]), torch.tensor([0])), None, logits_at=torch.tensor([[s - 1]]))
            scores = out[0, 0].float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
            token = int(scores.argmax())
            if token in ends:
                break
            answer.append(token)
            logprobs.append(float(scores[token]))
            seq.append(token)
    return answer, logprobs


def test_a_text_prompt_is_gmask_sop_and_its_ids_causal_throughout(tiny_tokenizer_file):
    tok = load_tokenizer(tiny_tokenizer_file, S)
    ids = causal_prompt("one two three", tok)
    assert ids == [S.gmask, S.sop] + tok.encode("one two three")
    fill, n = causal_fill(ids), len(ids)
    assert fill.causal and fill.tokens == ids and fill.positions == list(range(n)) and fill.bidirectional == 0
    assert [fill.position_after(g) for g in range(3)] == [n, n + 1, n + 2]
    assert splice(ids, fill.mask_index, [7, 8]) == ids + [7, 8]  # the answer goes after the whole context
    visible = ~SeqLayout(torch.tensor([0]), torch.tensor([fill.bidirectional])).mask(0, n, n, torch.device("cpu"))
    assert torch.equal(visible[0, 0], torch.ones(n, n).tril().bool())


@pytest.mark.parametrize("marker", ["[MASK]", "[sMASK]", "[gMASK]"])
def test_a_mask_marker_is_refused_not_guessed(ckpts, tiny_tokenizer_file, marker):
    engine = _engine(ckpts[1], tiny_tokenizer_file)
    refused, ids = engine.generate([Request("m", f"one two {marker} four"),
                                    Request("ids", token_ids=[5, S.mask, 6])])  # ids are the caller's: verbatim
    assert refused.finish_reason == "error" and refused.error_code == INVALID_PROMPT
    assert "no blank infilling" in refused.error and marker in refused.error
    assert ids.error is None and ids.token_ids[:3] == [5, S.mask, 6] and ids.prompt_tokens == 3


def test_greedy_tokens_equal_greedy_decoding_of_the_whole_sequence(ckpts, tiny_tokenizer_file):
    engine = _engine(ckpts[1], tiny_tokenizer_file)
    model, tok = load_model(ckpts[1], progress=False), engine.tok
    config = GenerationConfig(max_new_tokens=10, logprobs=2)
    requests = [Request(str(i), p, config=config) for i, p in enumerate(PROMPTS)]
    requests.append(Request("ids", token_ids=[5, 6, 7, 8], config=config))  # no prefix: none is added
    results = engine.generate(requests)
    for request, result in zip(requests, results):
        ids = request.token_ids or [S.gmask, S.sop] + tok.encode(request.text)
        want, logprobs = _whole_sequence_greedy(model, ids, 10, _allowed(tok), (S.eos, S.eop))
        assert result.token_ids == ids + want and result.blanks_token_ids == [want]
        assert result.prompt_tokens == len(ids) and result.completion_tokens == len(want)
        assert result.finish_reason == ("length" if len(want) == 10 else "stop")
        assert [lp.token_id for lp in result.logprobs] == want
        assert max(abs(lp.logprob - w) for lp, w in zip(result.logprobs, logprobs)) < 1e-4
        assert all(lp.top[0][0] == lp.token_id and len(lp.top) == 2 for lp in result.logprobs)
        if request.text is not None:  # the prompt as given, continued; no [gMASK] sop in the text
            lead = result.leads[0]
            assert result.text == join_answer(request.text, lead + result.blanks[0])
            assert result.blanks[0] == tok.decode(want) and not result.text.startswith("[gMASK]")


def _mixed_requests() -> list[Request]:
    """Several lengths and settings; with three rows, later requests join while others decode."""
    configs = [GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=3),
               GenerationConfig(strategy="sample", temperature=0.9, top_k=8, seed=7, max_new_tokens=9, logprobs=3),
               GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=6),
               GenerationConfig(strategy="sample", top_p=0.8, seed=11, max_new_tokens=10)]
    prompts = PROMPTS + ["seven eight nine ten", "tensor parallel ranks each hold one shard of every layer"]
    return [Request(f"r{i}", p, config=configs[i % len(configs)]) for i, p in enumerate(prompts)]


def _together_and_alone(tp, ckpt, tokfile):
    engine = _engine(ckpt, tokfile, tp=tp, max_batch=3)
    requests = _mixed_requests()
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    key = [(r.token_ids, r.finish_reason, r.error) for r in together]
    return key, [(r.token_ids, r.finish_reason, r.error) for r in alone]


def test_the_same_tokens_alone_in_a_mixed_batch_and_at_tp_2(ckpts, tiny_tokenizer_file):
    together, alone = run_ranks(1, _together_and_alone, ckpts[1], tiny_tokenizer_file)[0]
    assert together == alone and all(error is None for _, _, error in together)
    assert {reason for _, reason, _ in together} >= {"length"}
    tp2 = run_ranks(2, _together_and_alone, ckpts[2], tiny_tokenizer_file)
    assert tp2[0] == tp2[1] == (together, alone)


def test_streamed_deltas_add_up_to_the_answer_and_stop_strings_cut_it(ckpts, tiny_tokenizer_file):
    engine = _engine(ckpts[1], tiny_tokenizer_file)
    plain = engine.generate([Request("p", PROMPTS[1], config=GenerationConfig(max_new_tokens=12))])[0]
    words = plain.blanks[0].split()
    assert len(words) >= 3, f"the random model's answer is too short for this test: {plain.blanks[0]!r}"
    stop = words[2]
    coordinator, events = Coordinator(engine.tp, engine), []
    handle = coordinator.submit(Request("s", PROMPTS[1], config=GenerationConfig(max_new_tokens=12, stop=(stop,))),
                                events.append)
    while not handle.done:
        coordinator.step()
    stopped = handle.result()
    deltas = [e for e in events if isinstance(e, Delta)]
    assert isinstance(events[-1], Done) and isinstance(events[-2], BlankDone)
    assert "".join(d.text for d in deltas) == events[-2].text == stopped.blanks[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.blanks[0]
    assert stopped.blanks[0].rstrip() == plain.blanks[0][:plain.blanks[0].index(stop)].rstrip()
    assert stopped.token_ids == plain.token_ids[:len(stopped.token_ids)]


def test_the_models_stop_ids_end_an_answer_unasked(ckpts, tiny_tokenizer_file, tmp_path):
    engine = _engine(ckpts[1], tiny_tokenizer_file)
    plain = engine.generate([Request("p", PROMPTS[0], config=GenerationConfig(max_new_tokens=12))])[0]
    answer = plain.blanks_token_ids[0]
    assert len(answer) >= 3, "the random model's answer is too short for this test"
    stop_id = answer[2]
    ended = _engine(causal_checkpoint(tmp_path, 1, stop_ids=(stop_id,)), tiny_tokenizer_file).generate(
        [Request("s", PROMPTS[0], config=GenerationConfig(max_new_tokens=12))])[0]
    assert ended.blanks_token_ids == [answer[:answer.index(stop_id)]] and ended.finish_reason == "stop"


def test_stop_ids_may_be_generated_and_control_tokens_may_not(tiny_tokenizer_file):
    tok = load_tokenizer(tiny_tokenizer_file, S)
    role = 1010  # a token past the text and the blank tokens, such as GLM-4's <|user|>
    banned = banned_tokens(CFG.vocab_size, tok, (role,))
    assert not banned[[S.eos, S.eop, role]].any() and banned[[S.mask, S.gmask, S.smask, S.sop, 1011]].all()
    sampler = Sampler(banned, tok.decode)
    jobs = []
    for i in range(2):
        job = Job(RequestHandle(Request(str(i), "one two", config=GenerationConfig(max_new_tokens=4))),
                  GenerationConfig(), tok, CFG.vocab_size, CFG.max_seq_len, causal=True, stop_ids=(role,))
        job.start_fill()
        job.rows = [i]
        jobs.append(job)
    logits = torch.zeros(2, CFG.vocab_size)
    logits[0, S.gmask], logits[0, 9] = 10.0, 5.0  # [gMASK] is never chosen: the best text token is
    logits[1, role] = 10.0                         # the stop id ends the answer, as eos does
    choice = sampler.choose(jobs, logits)
    assert jobs[0].generated[0] == [9] and choice.ended == [(jobs[1], "stop")] and jobs[1].generated[0] == []


def test_cancelling_a_causal_request_frees_its_row(ckpts, tiny_tokenizer_file):
    engine = _engine(ckpts[1], tiny_tokenizer_file, max_batch=1)
    coordinator = Coordinator(engine.tp, engine)
    long = GenerationConfig(max_new_tokens=30, min_new_tokens=30)
    first = coordinator.submit(Request("a", PROMPTS[0], config=long))
    second = coordinator.submit(Request("b", PROMPTS[1]))
    for _ in range(4):
        coordinator.step()
    assert engine.scheduler.running == 1 and not second.done
    first.cancel()
    coordinator.step()
    assert first.done and first.result().finish_reason == "cancelled"
    assert 0 < first.result().completion_tokens < 30
    while not second.done:
        coordinator.step()
    assert second.result().token_ids == engine.generate([Request("b", PROMPTS[1])])[0].token_ids


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device here: CUDA graphs are checked on a GPU machine")
def test_cuda_graphs_give_the_eager_tokens_on_a_causal_model(ckpts, tiny_tokenizer_file):
    results = {}
    for graphs in (False, True):
        engine = engine_for(ckpts[1], tiny_tokenizer_file, device="cuda", dtype="fp16",
                            default=GenerationConfig(max_new_tokens=12), cuda_graphs=graphs)
        results[graphs] = [r.token_ids for r in engine.generate([Request(str(i), p) for i, p in enumerate(PROMPTS)])]
        assert bool(engine.decoder._graphs) == graphs
    assert results[True] == results[False]
