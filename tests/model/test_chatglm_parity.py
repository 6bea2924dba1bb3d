"""Parity with SwissArmyTransformer's ChatGLMModel on the same random weights (optional, like the GLM-130B
parity test): a [MASK] and a [gMASK] prompt in ChatGLM's 2D layout, prefill logits and greedy decoding
through both KV caches (SAT's past_key_values, glm-tp's Decoder) at TP 1 and 2."""
from __future__ import annotations

import pytest
import torch

from glm_tp import load_model
from glm_tp.checkpoints.sources import open_source
from glm_tp.config import PRESETS
from glm_tp.dev import reference
from glm_tp.text.blanks import next_blank
from tests.support.ranks import greedy_blank, run_ranks

pytestmark = pytest.mark.skipif(not reference.available(),
                                reason="SwissArmyTransformer is not installed (pip install -e '.[reference]')")
CFG = PRESETS["tiny-chatglm"]
S = CFG.special
PROMPTS = ([5, 6, S.mask, 8, 9, S.eos], [11, 12, 13, 14, 15, S.gmask])
STEPS = 6


def _pick(logits: torch.Tensor, seq: list[int]) -> int:
    """Greedy, never repeating a token of the sequence (random weights otherwise echo the last input)."""
    return int(logits.float().index_fill(0, torch.tensor(seq), float("-inf")).argmax())


def _blank(ids):
    return next_blank(ids, S.mask if S.mask in ids else S.gmask, S, "2d")


def _sat_name(name: str) -> str:
    return "mixins.chatglm-final.lm_head.weight" if name == "lm_head.weight" else name


def _sat_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    """SAT's ChatGLMModel stores QKV as [all q; all k; all v]; the Hugging Face (and glm-tp) layout is
    head-major ([q k v] of head 0, then head 1, ...). The same weights, rows in another order."""
    if "query_key_value" not in name:
        return t
    heads, d = CFG.num_heads, CFG.head_dim
    return t.reshape(heads, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _reference(_tp, ckpt):
    ref = reference.build_chatglm(CFG)
    source = open_source(ckpt)
    state = {_sat_name(n): _sat_layout(n, source.parts(n)[0]) for n in source.names()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or "position_embeddings" in k for k in missing), (missing, unexpected)
    results = []
    with torch.no_grad():
        for ids in PROMPTS:
            blank = _blank(ids)
            seq, positions, steps, past = list(blank.tokens), list(blank.positions), [], None
            for i in range(STEPS + 1):
                n = len(seq)
                visible = torch.ones(n, n).tril()
                visible[:, :blank.bidirectional] = 1
                pos = torch.tensor(positions).T.unsqueeze(0)  # [1, 2, n]: SAT's (position, block position)
                mask = visible if past is None else visible[-1:]  # a decode step: the new token's row
                out, *layers = ref(torch.tensor([seq]), attention_mask=mask.view(1, 1, -1, n).half(),
                                   position_ids=pos, past_key_values=past)
                past = [o["past_key_values"] for o in layers]
                logits = out[0, -1]
                if i == STEPS:
                    break
                steps.append(logits.float())
                seq.append(_pick(logits, seq))
                positions.append(blank.position_after(i))
            results.append((seq[len(blank.tokens):], torch.stack(steps)))
    return results


def _ours(tp, ckpt):
    model = load_model(ckpt, tp=tp, dtype="fp16", progress=False)
    results = []
    with torch.inference_mode():
        for ids in PROMPTS:
            blank = _blank(ids)
            answer, seen, _ = greedy_blank(model, blank, STEPS, position_dims=2, pick=_pick)
            results.append((answer, torch.stack(seen).float() if seen else None))
    return results if model.tp.is_first else None


def test_logits_and_greedy_tokens_match_sat_chatglm(tmp_path):
    from tests.support.checkpoints import write_random_checkpoint
    ckpt = write_random_checkpoint(tmp_path / "ck", CFG, 1, torch.float16)
    want = run_ranks(1, _reference, ckpt)[0]
    for tp in (1, 2):
        got = run_ranks(tp, _ours, ckpt)[0]
        for (ref_tokens, ref_steps), (tokens, steps) in zip(want, got):
            diff = (steps - ref_steps).abs().max().item()
            print(f"TP={tp}: max |logit diff| {diff:.4f}; SAT {ref_tokens}, glm-tp {tokens}")
            assert diff < 0.05 and tokens == ref_tokens
