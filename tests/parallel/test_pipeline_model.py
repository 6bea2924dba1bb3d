"""Pipeline parallelism end to end on gloo ranks: each stage loads only its layers, activations go stage to
stage, and the logits and every request's tokens equal those of one rank (TP 1), at PP 2, TP 2 x PP 2 and
PP 4, for a GLM blank model (every mask kind) and a causal ChatGLM2-shaped one."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.engine.core import Engine
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.model.glm import SeqLayout
from glm_tp.text.tokenizer import load_tokenizer
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import run_ranks

LAYOUTS = [(2, 1), (2, 2), (4, 1)]  # (pipeline_parallel, tensor_parallel)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pipeline")
    return {name: write_random_checkpoint(root / name, dataclasses.replace(PRESETS[name], num_layers=4), 1,
                                          torch.float32) for name in ("tiny", "tiny-chatglm2")}


def _load(tp, ckpt, pp: int):
    return load_model(ckpt, tp=tp, pipeline_parallel=pp, progress=False)


def _run(tp, ckpt, tokfile, pp: int):
    """The layers this rank holds, rank 0's logits of a two-row forward, and every request's tokens (and
    logprobs) through the engine."""
    model = _load(tp, ckpt, pp)
    held = sorted({n.split(".")[2] for n, _ in model.named_parameters() if n.startswith("transformer.layers.")})
    tokens = torch.tensor([[5, 9, 17, 33, 2, 7], [11, 3, 8, 21, 40, 6]])
    with torch.inference_mode():
        logits = model(tokens, torch.arange(6).expand(2, 6), SeqLayout(torch.tensor([0, 0]), torch.tensor([3, 2])),
                       None, logits_at=torch.tensor([[5, 2], [4, 5]]))
    # a causal model with a prefix cache: the repeated prompts hit it, stage by stage
    engine = Engine(model, load_tokenizer(tokfile, model.cfg.special), max_batch=3,
                    prefix_cache_tokens=512 if model.cfg.causal else 0)
    results = engine.generate(_requests(model.cfg.causal))
    assert not (model.cfg.causal and model.world.is_first) or engine.stats()["prefix_cache_reused_tokens"] > 0
    return held, None if logits is None else logits.float(), [(r.token_ids, r.finish_reason, r.error) for r in results], \
        [lp.logprob for r in results for lp in r.logprobs or []]


def _requests(causal: bool) -> list[Request]:
    configs = [GenerationConfig(max_new_tokens=10), GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=5),
               GenerationConfig(strategy="sample", temperature=0.9, top_k=8, seed=7, max_new_tokens=8, logprobs=2),
               GenerationConfig(strategy="sample", top_p=0.8, seed=11, max_new_tokens=6)]
    prompts = ["the quick brown fox", "one two three four five", "monday tuesday", "glm fills blanks"] if causal else \
        ["the quick [MASK] fox", "one [sMASK] three [MASK] five", "monday tuesday [gMASK]", "glm fills blanks"]
    return [Request(f"r{i}", p, config=configs[i % len(configs)]) for i, p in enumerate(prompts * 2)]


@pytest.mark.parametrize("name", ["tiny", "tiny-chatglm2"])
def test_stages_hold_their_layers_and_give_the_logits_and_tokens_of_one_rank(ckpts, tiny_tokenizer_file, name):
    _, alone, tokens, logprobs = run_ranks(1, _run, ckpts[name], tiny_tokenizer_file, 1)[0]
    assert all(error is None for _, _, error in tokens) and logprobs
    for pp, tp in LAYOUTS:
        out = run_ranks(pp * tp, _run, ckpts[name], tiny_tokenizer_file, pp)
        assert [held for held, *_ in out] == [[str(i) for i in range(4)][s * 4 // pp:(s + 1) * 4 // pp]
                                              for s in range(pp) for _ in range(tp)]
        assert all(logits is None for _, logits, _, _ in out[1:])
        assert (out[0][1] - alone).abs().max() < 1e-5, (pp, tp)
        assert all(rank[2] == tokens for rank in out), (pp, tp)  # every mask kind, greedy, beam, sampling
        assert len(out[0][3]) == len(logprobs) and max(abs(a - b) for a, b in zip(out[0][3], logprobs)) < 1e-4
