"""The config.json of ChatGLM2/3 and GLM-4 clones read into a `ModelConfig` (no preset needed), and written back
for a model of that architecture (glm-tp-make-checkpoint --layout chatglm2 / glm-hf).

Two files describe the same architecture (pre-LN RMSNorm, grouped-query attention, SwiGLU, rotary on half of
each head in interleaved pairs, QKV bias only, an untied output layer):

- THUDM's (`model_type: chatglm` with ChatGLM2's keys; chatglm2-6b(-int4), chatglm3-6b(-32k), glm-4-9b-chat):
  num_layers, hidden_size, num_attention_heads, kv_channels, multi_query_attention, multi_query_group_num,
  ffn_hidden_size, padded_vocab_size, seq_length, layernorm_epsilon, rmsnorm, post_layer_norm,
  apply_residual_connection_post_layernorm, add_bias_linear, add_qkv_bias, rope_ratio (absent: 1; the rotary
  base is 10000 x rope_ratio), quantization_bit (-int4: 4), eos_token_id (an int, or GLM-4's list: the first
  is the end of text, the others stop an answer), pad_token_id, torch_dtype. original_rope selects nothing in
  THUDM's rotary code: it is not read.
- transformers' (`model_type: glm`, GlmConfig; glm-4-9b-chat-hf): vocab_size, hidden_size, intermediate_size,
  num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, max_position_embeddings,
  rms_norm_eps, rope_theta and partial_rotary_factor (or rope_parameters holding them), attention_bias,
  tie_word_embeddings, eos_token_id, pad_token_id, hidden_act.

chatglm2-6b-int4 stores its linears as chatglm-6b-int4 does, which is glm-tp's own INT4 format (kernels/formats.py):
`weight` int8 [out, in/2] with two two's-complement 4-bit values per byte, the even input column in the high
nibble, and `weight_scale` fp16 [out] = the row's absmax / 7, w = q x scale. Its tensors are loaded as they are,
cut per rank like any quantized checkpoint (loader.py); the embedding and output layer stay float.

The special ids and the chat format come from the tokenizer files (tokenizer_files.py). What glm-tp's model
does not compute (a post-LN or LayerNorm variant, no QKV bias, other rotary shares) is refused in one line.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from glm_tp.checkpoints.release import CheckpointError
from glm_tp.checkpoints.tokenizer_files import TokenizerFacts, read_tokenizer
from glm_tp.config import ModelConfig, SpecialTokens, dtype_name, parse_dtype

CHATGLM2_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size")
GLM_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
_TORCH_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def is_chatglm2(conf: dict[str, Any]) -> bool:
    """ChatGLM2's keys (ChatGLM-6B's config.json, also model_type chatglm, has inner_hidden_size, vocab_size and
    mask_token_id instead)."""
    return any(key in conf for key in ("padded_vocab_size", "ffn_hidden_size", "multi_query_attention"))


def _need(conf: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in conf]
    if missing:
        raise CheckpointError(f"{path} lacks '{missing[0]}': not a {what} config (re-copy config.json)")


def _number(conf: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """config.json's `key` as an int or float (absent or null: `default`); a value of another type names the key."""
    value = default if conf.get(key) is None else conf[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (kind is int and not (math.isfinite(value) and value == int(value))):
        raise ValueError(f"{key}={value!r} is not {'a whole number' if kind is int else 'a number'}")
    return kind(value)


def _refuse(path: Path, conf: dict[str, Any], checks: dict[str, tuple[Any, Any]]) -> None:
    """checks: key -> (default when absent, the value glm-tp's model computes)."""
    for key, (default, supported) in checks.items():
        if conf.get(key, default) != supported:
            raise CheckpointError(f"{path}: {key}={conf.get(key, default)!r} is a variant glm-tp does not compute "
                                  f"(it runs {key}={supported!r})")


def _ids(eos: Any, pad: Any, facts: TokenizerFacts) -> tuple[SpecialTokens, tuple[int, ...]]:
    """The model's control ids: the blanks' from the tokenizer's specials, eos and pad from config.json, and the
    stop ids (the eos list's others, and the chat format's role stops)."""
    eos_list = [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    s, glm4 = facts.specials, facts.template == "glm4"
    sop, eop = ("<sop>", "<eop>") if glm4 else ("sop", "eop")
    special = SpecialTokens(mask=s["[MASK]"], gmask=s["[gMASK]"], smask=s["[sMASK]"], sop=s[sop], eop=s[eop],
                            eos=eos_list[0], pad=int(pad if pad is not None else 0))
    stops = sorted((set(eos_list[1:]) | set(facts.stop_ids())) - {special.eos, special.eop})
    return special, tuple(stops)


def _model(path: Path, facts: TokenizerFacts, eos: Any, pad: Any, **shape: Any) -> ModelConfig:
    special, stops = _ids(eos, pad, facts)
    try:
        return ModelConfig(**shape, special=special, position_encoding="half", mlp="swiglu", norm="rmsnorm",
                           causal=True, chat_template=facts.template, stop_ids=stops)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def chatglm2_metadata(root: Path, conf: dict[str, Any]) -> dict[str, Any]:
    """glm_tp.json-style metadata of a THUDM ChatGLM2/3 or GLM-4 clone."""
    path = root / "config.json"
    _need(conf, CHATGLM2_KEYS, path, "ChatGLM2")
    _refuse(path, conf, {"rmsnorm": (True, True), "post_layer_norm": (True, True),
                         "apply_residual_connection_post_layernorm": (False, False), "add_qkv_bias": (True, True),
                         "pre_seq_len": (None, None)})
    heads, hidden = _number(conf, "num_attention_heads", int), _number(conf, "hidden_size", int)
    if int(conf.get("kv_channels") or hidden // heads) * heads != hidden:
        raise CheckpointError(f"{path}: kv_channels {conf['kv_channels']} x {heads} heads is not hidden_size {hidden}: "
                              f"glm-tp's heads split the hidden size")
    bits = _number(conf, "quantization_bit", int, 0)
    if bits not in (0, 4, 8):
        raise CheckpointError(f"{path}: quantization_bit {bits} is not 4 or 8")
    vocab = _number(conf, "padded_vocab_size", int)
    facts = read_tokenizer(root, vocab)
    # multi-query off: ChatGLM2's QKV is head-major ([q k v] per head), glm-tp's layout without KV groups
    groups = int(conf.get("multi_query_group_num") or 0) if conf.get("multi_query_attention") else 0
    model = _model(path, facts, conf.get("eos_token_id", 2), conf.get("pad_token_id", 0),
                   num_layers=_number(conf, "num_layers", int), hidden_size=hidden, num_heads=heads,
                   inner_hidden_size=_number(conf, "ffn_hidden_size", int), vocab_size=vocab,
                   max_seq_len=_number(conf, "seq_length", int, 2048), layernorm_eps=_number(conf, "layernorm_epsilon", float, 1e-5),
                   rotary_base=10000.0 * _number(conf, "rope_ratio", float, 1), tied_lm_head=False, kv_groups=groups,
                   bias="all" if conf.get("add_bias_linear") else "qkv")
    return {"format": "hf", "tensor_names": "chatglm2", "model": model.to_dict(), "quant_bits": bits,
            "dtype": dtype_name(parse_dtype(conf.get("torch_dtype") or "float16")), **facts.metadata()}


def _rope(conf: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings: transformers' newer rope_parameters, or the keys at the top level."""
    params = conf.get("rope_parameters") if isinstance(conf.get("rope_parameters"), dict) else {}
    return {"rope_type": params.get("rope_type", "default"),
            "rope_theta": params.get("rope_theta", conf.get("rope_theta", 10000.0)),
            "partial_rotary_factor": params.get("partial_rotary_factor", conf.get("partial_rotary_factor", 0.5))}


def glm_metadata(root: Path, conf: dict[str, Any]) -> dict[str, Any]:
    """glm_tp.json-style metadata of a transformers GlmForCausalLM folder (glm-4-9b-chat-hf)."""
    path = root / "config.json"
    _need(conf, GLM_KEYS, path, "transformers Glm")
    rope = _rope(conf)
    _refuse(path, {**conf, **rope}, {"hidden_act": ("silu", "silu"), "attention_bias": (True, True),
                                     "partial_rotary_factor": (0.5, 0.5), "rope_type": ("default", "default"),
                                     "rope_scaling": (None, None)})
    heads, hidden = _number(conf, "num_attention_heads", int), _number(conf, "hidden_size", int)
    if int(conf.get("head_dim") or hidden // heads) * heads != hidden:
        raise CheckpointError(f"{path}: head_dim {conf['head_dim']} x {heads} heads is not hidden_size {hidden}: "
                              f"glm-tp's heads split the hidden size")
    vocab = _number(conf, "vocab_size", int)
    facts = read_tokenizer(root, vocab, prefer_json=True)
    model = _model(path, facts, conf.get("eos_token_id", 151329), conf.get("pad_token_id", 151329),
                   num_layers=_number(conf, "num_hidden_layers", int), hidden_size=hidden, num_heads=heads,
                   inner_hidden_size=_number(conf, "intermediate_size", int), vocab_size=vocab,
                   max_seq_len=_number(conf, "max_position_embeddings", int, 131072),
                   layernorm_eps=_number(conf, "rms_norm_eps", float, 1.5625e-07), rotary_base=float(rope["rope_theta"]),
                   tied_lm_head=bool(conf.get("tie_word_embeddings", False)),
                   kv_groups=int(conf.get("num_key_value_heads") or heads), bias="qkv")
    return {"format": "hf", "tensor_names": "glm", "model": model.to_dict(), "quant_bits": 0,
            "dtype": dtype_name(parse_dtype(conf.get("torch_dtype") or conf.get("dtype") or "bfloat16")),
            **facts.metadata()}


def _eos(cfg: ModelConfig) -> int | list[int]:
    """GLM-4 lists its stop ids after the end of text; ChatGLM2/3 give the one id."""
    return [cfg.special.eos, *cfg.stop_ids] if cfg.chat_template == "glm4" else cfg.special.eos


def chatglm2_config(cfg: ModelConfig, quant_bits: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """The config.json THUDM ship for a model of this shape."""
    out = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": cfg.num_layers,
           "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads, "kv_channels": cfg.head_dim,
           "multi_query_attention": bool(cfg.kv_groups), "multi_query_group_num": cfg.kv_groups or cfg.num_heads,
           "ffn_hidden_size": cfg.inner_hidden_size, "padded_vocab_size": cfg.vocab_size, "seq_length": cfg.max_seq_len,
           "layernorm_epsilon": cfg.layernorm_eps, "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
           "post_layer_norm": True, "add_bias_linear": cfg.bias == "all", "add_qkv_bias": True, "original_rope": True,
           "quantization_bit": quant_bits, "eos_token_id": _eos(cfg), "pad_token_id": cfg.special.pad,
           "torch_dtype": _TORCH_DTYPES[dtype]}
    if cfg.rotary_base != 10000.0:
        out["rope_ratio"] = cfg.rotary_base / 10000.0
    return out


def glm_config(cfg: ModelConfig, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """The config.json of transformers' GlmForCausalLM for a model of this shape."""
    return {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.inner_hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.layernorm_eps,
            "rope_theta": cfg.rotary_base, "partial_rotary_factor": 0.5, "attention_bias": True,
            "tie_word_embeddings": cfg.tied_lm_head, "eos_token_id": [cfg.special.eos, *cfg.stop_ids],
            "pad_token_id": cfg.special.pad, "torch_dtype": _TORCH_DTYPES[dtype]}
