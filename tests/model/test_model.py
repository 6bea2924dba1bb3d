"""The forward pass: TP equivalence, KV-cache decode and the formulas of the reference."""
from __future__ import annotations

import math

import torch

from glm_tp import SeqLayout, load_model
from glm_tp.checkpoints.synthetic import random_shard
from glm_tp.config import PRESETS, ModelConfig
from glm_tp.model.glm import GLMModel
from glm_tp.parallel.dist import single_process
from tests.support.ranks import run_ranks

# Two left-padded prompts: a [MASK]-style one (positions pinned after sop) and a [gMASK]-style one.
TOKENS = torch.tensor([[0, 0, 0, 5, 6, 7, 1000, 8, 2, 1004, 31, 32],
                       [11, 12, 13, 14, 15, 16, 17, 18, 1001, 1004, 40, 41]])
POSITIONS = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5, 3, 3, 3],
                          [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
LAYOUT = SeqLayout(pad=torch.tensor([3, 0]), bidirectional=torch.tensor([6, 9]))


def _all_logits(tp, ckpt):
    model = load_model(ckpt, tp=tp, progress=False)
    with torch.inference_mode():
        return model(TOKENS, POSITIONS, LAYOUT, model.new_cache(2, 16), logits_at=torch.arange(12).expand(2, 12))


def test_tensor_parallel_logits_match_tp1(tiny_checkpoints):
    ref = run_ranks(1, _all_logits, tiny_checkpoints[1])[0]
    assert torch.isfinite(ref).all() and ref.std() > 0.5  # random weights still give spread-out logits
    for tp in (2, 4):
        out = run_ranks(tp, _all_logits, tiny_checkpoints[tp])
        assert out[1:] == [None] * (tp - 1)  # logits are gathered on rank 0 only
        err = (out[0] - ref).abs().max().item()
        assert err < 1e-4, f"TP={tp} differs from TP=1 by {err}"


def _decode_vs_recompute(tp, ckpt):
    model = load_model(ckpt, tp=tp, progress=False)
    with torch.inference_mode():
        prefix = 10  # the whole context through sop: bidirectional tokens must be prefilled together
        cache = model.new_cache(2, 16)
        steps = [model(TOKENS[:, :prefix], POSITIONS[:, :prefix], LAYOUT, cache)]
        for i in range(prefix, TOKENS.shape[1]):  # one token at a time through the cache
            steps.append(model(TOKENS[:, i:i + 1], POSITIONS[:, i:i + 1], LAYOUT, cache, start=i))
        full = model(TOKENS, POSITIONS, LAYOUT, model.new_cache(2, 16), logits_at=torch.arange(prefix - 1, 12).expand(2, -1))
    return None if steps[0] is None else (torch.stack(steps, dim=1), full)


def test_kv_cache_decode_equals_full_recompute(tiny_checkpoints):
    for tp in (1, 2):
        stepped, full = run_ranks(tp, _decode_vs_recompute, tiny_checkpoints[tp])[0]
        assert (stepped - full).abs().max().item() < 1e-4


def _reference_forward(sd: dict, cfg: ModelConfig, ids: list[int], pos: list[int], bidir: int) -> torch.Tensor:
    """Plain float64 loops over the formulas of the GLM-130B reference, independent of glm_tp.model.glm."""
    t = {k: v.double() for k, v in sd.items()}
    h_dim, heads, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    alpha = math.sqrt(2 * cfg.num_layers)

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layernorm_eps) * w + b

    def rope(v, p):  # rotate pair (i, i + d/2) by p * base^(-2i/d); the reference does this arithmetic in fp16
        out = v.clone()
        for i in range(d // 2):
            theta = torch.tensor(float(p), dtype=torch.half) * torch.tensor(cfg.rotary_base ** (-2 * i / d)).half()
            cos, sin = theta.cos().double(), theta.sin().double()
            a, b = v[i], v[i + d // 2]
            out[i], out[i + d // 2] = a * cos - b * sin, b * cos + a * sin
        return out

    n = len(ids)
    x = t["transformer.word_embeddings.weight"][ids]
    for layer in range(cfg.num_layers):
        p = f"transformer.layers.{layer}."
        h = ln(x, t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"])
        qkv = h @ t[p + "attention.query_key_value.weight"].T + t[p + "attention.query_key_value.bias"]
        qkv = qkv.view(n, heads, 3, d)  # head-major: [q k v] of head 0, then head 1, ...
        ctx = torch.zeros(n, heads, d, dtype=torch.float64)
        for hd in range(heads):
            q = torch.stack([rope(qkv[i, hd, 0], pos[i]) for i in range(n)])
            k = torch.stack([rope(qkv[i, hd, 1], pos[i]) for i in range(n)])
            for i in range(n):
                seen = [j for j in range(n) if j < bidir or j <= i]
                w = torch.softmax(torch.stack([q[i] @ k[j] / math.sqrt(d) for j in seen]), 0)
                ctx[i, hd] = sum(wj * qkv[j, hd, 2] for wj, j in zip(w, seen))
        attn = ctx.reshape(n, h_dim) @ t[p + "attention.dense.weight"].T + t[p + "attention.dense.bias"]
        x = alpha * h + attn
        m = ln(x, t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"])
        up = m @ t[p + "mlp.dense_h_to_4h.weight"].T + t[p + "mlp.dense_h_to_4h.bias"]
        value, gate = up[:, :cfg.inner_hidden_size], up[:, cfg.inner_hidden_size:]
        gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
        x = alpha * m + (value * gelu) @ t[p + "mlp.dense_4h_to_h.weight"].T + t[p + "mlp.dense_4h_to_h.bias"]
    y = ln(x, t["transformer.final_layernorm.weight"], t["transformer.final_layernorm.bias"])
    return y @ t["transformer.word_embeddings.weight"].T


def test_forward_matches_independent_formulas():
    for layers in (1, 2):  # two layers also exercise alpha = sqrt(2L) and the per-layer softmax scale
        cfg = ModelConfig(num_layers=layers, hidden_size=32, num_heads=2, inner_hidden_size=48, vocab_size=64,
                          max_seq_len=32)
        sd = random_shard(cfg, 1, 0, seed=7, dtype=torch.float32)
        model = GLMModel(cfg, single_process(), torch.float32)
        model.load_state_dict(sd, strict=True)
        ids, pos, bidir = [5, 9, 3, 17, 40, 2, 60, 33], [0, 1, 2, 3, 4, 5, 2, 2], 5
        with torch.inference_mode():
            got = model(torch.tensor([ids]), torch.tensor([pos]), SeqLayout(torch.tensor([0]), torch.tensor([bidir])),
                        model.new_cache(1, 8), logits_at=torch.arange(len(ids))[None])[0]
        want = _reference_forward(sd, cfg, ids, pos, bidir).float()
        assert (got - want).abs().max().item() < 1e-4


def test_fp16_and_bf16_forward_stay_close_to_fp32(tiny_checkpoints):
    ref = load_model(tiny_checkpoints[1], dtype="fp32", progress=False)
    with torch.inference_mode():
        want = ref(TOKENS, POSITIONS, LAYOUT, ref.new_cache(2, 16))
        for dtype, tol in (("fp16", 0.05), ("bf16", 0.3)):
            model = load_model(tiny_checkpoints[1], dtype=dtype, progress=False)
            got = model(TOKENS, POSITIONS, LAYOUT, model.new_cache(2, 16)).float()
            assert (got - want).abs().max().item() < tol, dtype
            assert (got.argmax(-1) == want.argmax(-1)).all()



def test_truncating_layers_keeps_the_full_models_deepnorm_alpha():
    full = PRESETS["glm-130b"]
    assert full.with_layers(2).deepnorm_alpha == full.deepnorm_alpha == math.sqrt(140)
    assert ModelConfig.from_dict(full.with_layers(2).to_dict()).deepnorm_alpha == math.sqrt(140)  # metadata keeps it
