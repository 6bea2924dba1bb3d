"""Parity with the reference: SwissArmyTransformer's GLM130B on the same random weights (optional).

Runs only where the `reference` extra is installed; SAT's GLM130B is CUDA/apex-era code, so on CPU it
needs the two monkeypatches its own setup lacks (a CPU "current device" and a bool attention mask),
and it only runs in fp16.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
import torch

from distributed import run_ranks
from glm_tp import SeqLayout, load_model
from glm_tp.checkpoint import open_shard

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sat") is None,
                                reason="SwissArmyTransformer is not installed (pip install -e '.[reference]')")

# [MASK] prompt: context bidirectional up to (not incl.) sop, generated positions pinned to the mask (index 3)
MASK_IDS = [5, 6, 7, 1000, 8, 9, 2, 1004]
MASK_POS = [0, 1, 2, 3, 4, 5, 6, 3]
GMASK_IDS = [11, 12, 13, 14, 15, 1001, 1004]
GMASK_POS = list(range(7))
STEPS = 6


def _import_sat_glm130b():
    if importlib.util.find_spec("wandb") is None:
        sys.modules.setdefault("deepspeed", None)  # sat imports wandb only next to deepspeed
    torch.cuda.current_device = lambda: "cpu"
    from sat.model.official import glm130B_model

    mixin = glm130B_model.SelfAttentionWithFP32SoftmaxMixin
    if not getattr(mixin, "_bool_mask_patch", False):
        original = mixin.attention_fn

        def attention_fn(self, q, k, v, mask, *args, **kw):
            return original(self, q, k, v, mask.bool(), *args, **kw)

        mixin.attention_fn, mixin._bool_mask_patch = attention_fn, True
    return glm130B_model.GLM130B


def _mask(total: int, bidirectional: int) -> torch.Tensor:
    visible = torch.ones(total, total).tril()
    visible[:, :bidirectional] = 1
    return (visible < 0.5).view(1, 1, total, total)  # True = masked, as the reference builds it


def _greedy(step_logits, ids: list[int], pos: list[int], pinned: int | None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation by full recompute, never repeating a token already in the sequence (random
    weights otherwise echo the last input token, which would compare nothing)."""
    ids, pos, out, logits = list(ids), list(pos), [], []
    for _ in range(STEPS):
        last = step_logits(ids, pos)
        logits.append(last)
        tok = int(last.index_fill(0, torch.tensor(ids), float("-inf")).argmax())
        out.append(tok)
        ids.append(tok)
        pos.append(pinned if pinned is not None else pos[-1] + 1)
    return out, logits


def _run_both(tp, ckpt):
    ours = load_model(ckpt, tp=tp, dtype="fp16", progress=False)
    GLM130B = _import_sat_glm130b()
    cfg = ours.cfg
    args = argparse.Namespace(
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads, inner_hidden_size=cfg.inner_hidden_size,
        max_sequence_length=cfg.max_seq_len, layernorm_order="post", layernorm_epsilon=cfg.layernorm_eps,
        fp16=True, model_parallel_size=1, position_encoding_2d=False, no_glu=False, skip_init=True,
        hidden_dropout=0.0, attention_dropout=0.0)
    ref = GLM130B(args).half().eval()
    state, _ = open_shard(next((ckpt / "1").glob("mp_rank_00_*")))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)

    def ref_logits(ids, pos, bidir):
        n = len(ids)
        with torch.no_grad():
            out = ref(torch.tensor([ids]), torch.tensor([pos]), _mask(n, bidir))[0]
        return out[0].float()

    def our_logits(ids, pos, bidir):
        n = len(ids)
        with torch.inference_mode():
            return ours(torch.tensor([ids]), torch.tensor([pos]), SeqLayout(torch.tensor([0]), torch.tensor([bidir])),
                        ours.new_cache(1, n), logits_at=torch.arange(n)[None])[0].float()

    results = {}
    for name, ids, pos, pinned in (("mask", MASK_IDS, MASK_POS, 3), ("gmask", GMASK_IDS, GMASK_POS, None)):
        bidir = len(ids) - 1
        full_diff = (ref_logits(ids, pos, bidir) - our_logits(ids, pos, bidir)).abs().max().item()
        ref_tokens, _ = _greedy(lambda i, p: ref_logits(i, p, bidir)[-1], ids, pos, pinned)
        our_tokens, _ = _greedy(lambda i, p: our_logits(i, p, bidir)[-1], ids, pos, pinned)
        results[name] = (full_diff, ref_tokens, our_tokens)
    return results


def test_logits_and_greedy_tokens_match_swissarmytransformer(tmp_path):
    from conftest import write_random_checkpoint
    from glm_tp.config import PRESETS

    ckpt = write_random_checkpoint(tmp_path / "fp16", PRESETS["tiny"], 1, torch.float16)
    results = run_ranks(1, _run_both, ckpt)[0]
    for name, (diff, ref_tokens, our_tokens) in results.items():
        print(f"{name}: max |logit diff| {diff:.4f}, reference {ref_tokens}, glm-tp {our_tokens}")
        assert diff < 0.05, f"{name}: logits differ by {diff}"
        assert ref_tokens == our_tokens
