"""Parity with the reference: SwissArmyTransformer's GLM130B on the same random weights (optional).

Runs only where the `reference` extra is installed (glm_tp/dev/reference.py makes SAT's GLM130B run on CPU,
in fp16). Both sides prefill a [MASK] and a [gMASK] prompt, then decode greedily through their own KV
caches: SAT's `mems` and glm-tp's Decoder, at TP 1 and 2.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glm_tp import SeqLayout, load_model
from glm_tp.checkpoints.release import open_shard
from glm_tp.dev import reference
from tests.support.ranks import greedy_blank, run_ranks

pytestmark = pytest.mark.skipif(not reference.available(),
                                reason="SwissArmyTransformer is not installed (pip install -e '.[reference]')")

# [MASK] prompt: context bidirectional up to (not incl.) sop, generated positions pinned to the mask (index 3)
MASK_IDS = [5, 6, 7, 1000, 8, 9, 2, 1004]
MASK_POS = [0, 1, 2, 3, 4, 5, 6, 3]
GMASK_IDS = [11, 12, 13, 14, 15, 1001, 1004]
GMASK_POS = list(range(7))
PROMPTS = (("mask", MASK_IDS, MASK_POS, 3), ("gmask", GMASK_IDS, GMASK_POS, None))  # name, ids, positions, pinned
STEPS = 6


def _pick(logits: torch.Tensor, seq: list[int]) -> int:
    """Greedy, never repeating a token already in the sequence (random weights otherwise echo the last
    input token, which would compare nothing)."""
    return int(logits.float().index_fill(0, torch.tensor(seq), float("-inf")).argmax())


def _reference(_tp, ckpt):
    """SAT's GLM130B: full prompt logits, then its own decode loop (the KV memory `mems` grown per step)."""
    cfg = load_model(ckpt, progress=False).cfg
    ref = reference.build(cfg)
    state, _ = open_shard(next((ckpt / "1").glob("mp_rank_00_*")))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    results = {}
    with torch.no_grad():
        for name, ids, pos, pinned in PROMPTS:
            n = len(ids)
            full, *layers = ref(torch.tensor([ids]), torch.tensor([pos]), reference.mask(n, n - 1))
            mems = torch.stack([o["mem_kv"] for o in layers])
            seq, steps, logits = list(ids), [], full[0, -1]
            for i in range(STEPS):
                steps.append(logits.float())
                seq.append(_pick(logits, seq))
                position = pinned if pinned is not None else n + i
                out, *layers = ref(torch.tensor([[seq[-1]]]), torch.tensor([[position]]),
                                   torch.zeros(1, 1, 1, n + i + 1, dtype=torch.bool), mems=mems)
                mems = torch.cat([mems, torch.stack([o["mem_kv"] for o in layers])], dim=2)
                logits = out[0, -1]
            results[name] = (full[0].float(), seq[n:], torch.stack(steps))
    return results


def _ours(tp, ckpt):
    """glm-tp at this TP size: full prompt logits, then the engine's decode path (Decoder steps); rank 0
    picks each token and shares it, as the engine does."""
    model = load_model(ckpt, tp=tp, dtype="fp16", progress=False)
    results = {}
    with torch.inference_mode():
        for name, ids, pos, pinned in PROMPTS:
            n = len(ids)
            layout = SeqLayout(torch.tensor([0]), torch.tensor([n - 1]))
            full = model(torch.tensor([ids]), torch.tensor([pos]), layout, None, logits_at=torch.arange(n)[None])
            blank = SimpleNamespace(tokens=ids, positions=pos, bidirectional=n - 1, counting=int(pinned is None),
                                    next_position=pinned if pinned is not None else n)
            answer, seen, _ = greedy_blank(model, blank, STEPS, pick=_pick)
            results[name] = (full[0].float(), answer, torch.stack(seen).float()) if full is not None else None
    return results


def test_logits_and_greedy_tokens_match_swissarmytransformer(tmp_path):
    from glm_tp.config import PRESETS
    from tests.support.checkpoints import write_random_checkpoint

    checkpoints = {tp: write_random_checkpoint(tmp_path / f"tp{tp}", PRESETS["tiny"], tp, torch.float16) for tp in (1, 2)}
    want = run_ranks(1, _reference, checkpoints[1])[0]
    for tp, ckpt in checkpoints.items():
        got = run_ranks(tp, _ours, ckpt)[0]
        for name, (ref_full, ref_tokens, ref_steps) in want.items():
            full, tokens, steps = got[name]
            prompt_diff, step_diff = (full - ref_full).abs().max().item(), (steps - ref_steps).abs().max().item()
            print(f"TP={tp} {name}: max |logit diff| prompt {prompt_diff:.4f}, decode steps {step_diff:.4f}; "
                  f"reference {ref_tokens}, glm-tp {tokens}")
            assert prompt_diff < 0.05 and step_diff < 0.05, f"TP={tp} {name}: logits differ"
            assert tokens == ref_tokens
