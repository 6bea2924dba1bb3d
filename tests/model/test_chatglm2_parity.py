"""The ChatGLM2/3 and GLM-4 architecture (pre-LN RMSNorm, grouped-query attention with 2 KV groups, SwiGLU,
pair rotary on half of each head, QKV bias only) against transformers' GlmForCausalLM on the same random
weights: logits along greedy decoding through glm-tp's KV cache, at TP 1, 2, 4 and 8 (4 and 8 > the KV groups:
each rank holds the group its heads use; 8: one head per rank)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glm_tp import load_model
from glm_tp.checkpoints.sources import open_source
from glm_tp.config import PRESETS
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import greedy_blank, run_ranks

CFG = PRESETS["tiny-chatglm2"]
PROMPTS = ([5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19])
STEPS = 6


def _pick(logits: torch.Tensor, seq: list[int]) -> int:
    """Greedy, never repeating a token of the sequence (random weights otherwise echo the last input)."""
    return int(logits.float().index_fill(0, torch.tensor(seq), float("-inf")).argmax())


# where each layout keeps what GlmForCausalLM calls embed_tokens, norm, lm_head, a layer and its attention
GLM_TP_NAMES = {"embed": "transformer.word_embeddings.weight", "norm": "transformer.final_layernorm.weight",
                "head": "lm_head.weight", "layer": "transformer.layers.{}.", "attention": "attention"}


def to_glm_for_causal_lm(state: dict[str, torch.Tensor], layers: int, d: int, heads: int, groups: int,
                         names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A fused-QKV ([all q ; all k ; all v]) state dict named as `names` says -> GlmForCausalLM's names and
    q/k/v projections (written here, independently of glm-tp's own name table)."""
    out = {"model.embed_tokens.weight": state[names["embed"]], "model.norm.weight": state[names["norm"]],
           "lm_head.weight": state[names["head"]]}
    for i in range(layers):
        ours, theirs, attn = names["layer"].format(i), f"model.layers.{i}.", names["attention"]
        for kind in ("weight", "bias"):
            qkv = state[f"{ours}{attn}.query_key_value.{kind}"].split([heads * d, groups * d, groups * d])
            out.update({f"{theirs}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", qkv)})
        for name, hf in ((f"{attn}.dense", "self_attn.o_proj"), ("mlp.dense_h_to_4h", "mlp.gate_up_proj"),
                         ("mlp.dense_4h_to_h", "mlp.down_proj"), ("input_layernorm", "input_layernorm"),
                         ("post_attention_layernorm", "post_attention_layernorm")):
            out[f"{theirs}{hf}.weight"] = state[f"{ours}{name}.weight"]
    return out


def _hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return to_glm_for_causal_lm(state, CFG.num_layers, CFG.head_dim, CFG.num_heads, CFG.kv_groups, GLM_TP_NAMES)


def _reference(ckpt) -> list[tuple[list[int], torch.Tensor]]:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    config = transformers.GlmConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, intermediate_size=CFG.inner_hidden_size,
        num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.kv_groups,
        head_dim=CFG.head_dim, max_position_embeddings=CFG.max_seq_len, rms_norm_eps=CFG.layernorm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": CFG.rotary_base, "partial_rotary_factor": 0.5},
        attention_bias=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    ref = transformers.GlmForCausalLM(config).eval()
    source = open_source(ckpt)
    ref.load_state_dict(_hf_state({n: source.parts(n)[0] for n in source.names()}), strict=True)
    results = []
    with torch.no_grad():
        for ids in PROMPTS:  # the whole sequence every step: no cache on this side
            seq, steps = list(ids), []
            for _ in range(STEPS):
                steps.append(ref(torch.tensor([seq])).logits[0, -1].float())
                seq.append(_pick(steps[-1], seq))
            results.append((seq[len(ids):], torch.stack(steps)))
    return results


def _ours(tp, ckpt):
    model = load_model(ckpt, tp=tp, dtype="fp32", progress=False)
    results = []
    with torch.inference_mode():
        for ids in PROMPTS:  # causal over the whole sequence: nothing bidirectional, positions 0, 1, 2, ...
            prompt = SimpleNamespace(tokens=list(ids), positions=list(range(len(ids))), bidirectional=0,
                                     next_position=len(ids), counting=1)
            answer, seen, _ = greedy_blank(model, prompt, STEPS, pick=_pick)
            results.append((answer, torch.stack(seen) if seen else None))
    return results if model.tp.is_first else None


def test_logits_and_greedy_tokens_match_transformers_glm(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    ckpt = write_random_checkpoint(tmp_path / "ck", CFG, 1, torch.float32)
    want = _reference(ckpt)
    for tp in (1, 2, 4, 8):
        got = run_ranks(tp, _ours, ckpt)[0]
        for (ref_tokens, ref_steps), (tokens, steps) in zip(want, got):
            diff = (steps - ref_steps).abs().max().item()
            print(f"TP={tp}: max |logit diff| {diff:.2e}; transformers {ref_tokens}, glm-tp {tokens}")
            assert diff < 1e-4 and tokens == ref_tokens
