"""The tensor names of the Hugging Face layouts glm-tp reads, mapped onto its own (the release naming the model
and partition.py use): the one home of that mapping. sources.py serves every layout under glm-tp's names
through it (so the loader and reshard, glm-tp-repartition and glm-tp-quantize, read them all), and
glm-tp-make-checkpoint writes each layout with its inverse.

- "chatglm" (ChatGLM-6B): the names are glm-tp's own.
- "chatglm2" (THUDM's ChatGLM2/3 and GLM-4 files): transformer.embedding.word_embeddings,
  transformer.encoder.layers.N.self_attention.*, transformer.encoder.final_layernorm, transformer.output_layer.
  The fused QKV is already [all q ; all k ; all v], glm-tp's grouped layout; -int4's weight_scale follow their
  weights. transformer.rotary_pos_emb.inv_freq is a buffer the loader ignores (partition.IGNORED_SUFFIXES).
- "glm" (transformers' GlmForCausalLM, glm-4-9b-chat-hf): model.embed_tokens, model.layers.N.self_attn.
  {q,k,v,o}_proj, mlp.gate_up_proj, mlp.down_proj, model.norm, lm_head. q, k and v are stored apart: they are
  the three row blocks of glm-tp's fused QKV, in that order (`fused_part`).
"""
from __future__ import annotations

import re

import torch

from glm_tp.config import ModelConfig

LAYOUTS = ("chatglm", "chatglm2", "glm")
QKV = "attention.query_key_value"
GLM_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the fused QKV's row blocks, in order

# (their prefix outside the layers, ours), their layers' prefix, (their prefix inside a layer, ours)
_RULES: dict[str, tuple[tuple[tuple[str, str], ...], str, tuple[tuple[str, str], ...]]] = {
    "chatglm2": ((("transformer.embedding.word_embeddings.", "transformer.word_embeddings."),
                  ("transformer.encoder.final_layernorm.", "transformer.final_layernorm."),
                  ("transformer.output_layer.", "lm_head.")),
                 "transformer.encoder.layers.", (("self_attention.", "attention."),)),
    "glm": ((("model.embed_tokens.", "transformer.word_embeddings."), ("model.norm.", "transformer.final_layernorm."),
             ("lm_head.", "lm_head.")),
            "model.layers.", (("self_attn.o_proj.", "attention.dense."), ("mlp.gate_up_proj.", "mlp.dense_h_to_4h."),
                              ("mlp.down_proj.", "mlp.dense_4h_to_h."))),
}
_OUR_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


def _swap(name: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> str:
    for theirs, ours in pairs:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def ours(name: str, layout: str) -> str:
    """glm-tp's name for a tensor stored as `name` in `layout`. Names the rules do not know come back as they
    are (the loader reports them as unused). glm's q/k/v: see fused_part."""
    if layout == "chatglm":
        return name
    outer, layers, inner = _RULES[layout]
    if name.startswith(layers):
        index, _, rest = name[len(layers):].partition(".")
        if layout == "glm" and (part := _qkv_part(rest)) is not None:
            return f"transformer.layers.{index}.{QKV}.{part[1]}"
        return f"transformer.layers.{index}.{_swap(rest, inner, False)}"
    return _swap(name, outer, False)


def fused_part(name: str, layout: str) -> int | None:
    """Which row block of glm-tp's fused QKV the stored tensor `name` is (glm: q 0, k 1, v 2); None if it is
    a whole tensor."""
    if layout != "glm" or not name.startswith(_RULES["glm"][1]):
        return None
    part = _qkv_part(name[len(_RULES["glm"][1]):].partition(".")[2])
    return None if part is None else part[0]


def _qkv_part(rest: str) -> tuple[int, str] | None:
    for i, proj in enumerate(GLM_QKV):
        if rest.startswith(proj + "."):
            return i, rest[len(proj) + 1:]
    return None


def theirs(name: str, layout: str) -> list[str]:
    """The stored name(s) of glm-tp's tensor `name` in `layout`: glm's fused QKV is three (q, k, v)."""
    if layout == "chatglm":
        return [name]
    outer, layers, inner = _RULES[layout]
    m = _OUR_LAYER.match(name)
    if not m:
        return [_swap(name, outer, True)]
    index, rest = m.groups()
    if layout == "glm" and rest.startswith(QKV + "."):
        return [f"{layers}{index}.{proj}.{rest[len(QKV) + 1:]}" for proj in GLM_QKV]
    return [f"{layers}{index}.{_swap(rest, inner, True)}"]


def split_fused(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """glm-tp's fused QKV (weight or bias rows [all q ; all k ; all v]) as glm's q, k and v projections (copies:
    a file may not hold views of one tensor)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return [block.clone() for block in t.split([q, kv, kv])]


def stored(tensors: dict[str, torch.Tensor], cfg: ModelConfig, layout: str) -> dict[str, torch.Tensor]:
    """glm-tp's tensors under their stored names in `layout`."""
    out = {}
    for name, t in tensors.items():
        kept = theirs(name, layout)
        out.update(zip(kept, [t] if len(kept) == 1 else split_fused(t, cfg)))
    return out
