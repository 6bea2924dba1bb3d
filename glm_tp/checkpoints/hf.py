"""The Hugging Face layouts: `config_metadata` reads any clone's config.json (ChatGLM-6B's here; ChatGLM2/3 and
GLM-4, THUDM's or transformers', in chatglm2.py: told apart by their keys), and `write_hf_layout` writes the
files of a clone in any of them (for tests and for users who want one: `glm-tp-make-checkpoint --layout ...`).

ChatGLM-6B's config.json keys read: num_layers, hidden_size, num_attention_heads, inner_hidden_size, vocab_size,
max_sequence_length, layernorm_epsilon, position_encoding_2d, mask/gmask/bos/eos/pad_token_id,
quantization_bit (chatglm-6b-int4: 4) and quantization_embeddings (not supported). The tokenizer is
`ice_text.model` (icetk's sentencepiece model without its 20000 image tokens: text ids start at 0).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from glm_tp.checkpoints import chatglm2
from glm_tp.checkpoints import names as tensor_names
from glm_tp.checkpoints.release import CheckpointError
from glm_tp.config import ModelConfig, SpecialTokens, dtype_name, parse_dtype

CONFIG_KEYS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_heads",
               "vocab_size": "vocab_size"}
ICE_MASK_PIECE = 130000  # [MASK]'s sentencepiece id in ice_text.model; image tokens, if kept, come before it


def config_metadata(root: Path) -> dict[str, Any]:
    """glm_tp.json-style metadata for a Hugging Face folder, from its config.json (and the tokenizer files)."""
    path = root / "config.json"
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-copy it") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{path} is not a JSON object: re-copy it")
    try:
        return _metadata(root, conf, path)
    except (TypeError, ValueError, OverflowError) as e:  # a value of the wrong type or out of bounds, any key
        raise CheckpointError(f"{path}: {e}") from None


def _metadata(root: Path, conf: dict[str, Any], path: Path) -> dict[str, Any]:
    if conf.get("model_type") == "glm":
        return chatglm2.glm_metadata(root, conf)
    if chatglm2.is_chatglm2(conf):
        return chatglm2.chatglm2_metadata(root, conf)
    missing = [k for k in list(CONFIG_KEYS) + ["mask_token_id", "gmask_token_id", "bos_token_id", "eos_token_id"]
               if k not in conf]
    if missing:
        raise CheckpointError(f"{path} lacks '{missing[0]}': not a ChatGLM-6B config (re-copy config.json)")
    if conf.get("quantization_embeddings"):
        raise CheckpointError(f"{path}: quantized embeddings (chatglm-6b-int4-qe) are not supported: "
                              f"use chatglm-6b-int4 or chatglm-6b with quant=int4")
    offset = _text_offset(root, int(conf["mask_token_id"]))
    dtype = conf.get("torch_dtype", "float16")
    return {"format": "hf", "model": config_model(conf, offset).to_dict(),
            "quant_bits": int(conf.get("quantization_bit") or 0), "dtype": dtype_name(parse_dtype(dtype)),
            "tokenizer": "ice_text.model", "tokenizer_offset": offset, "tokenizer_whitespace": True}


def config_model(conf: dict[str, Any], offset: int) -> ModelConfig:
    """The model a ChatGLM-6B config.json describes; `offset`: the image tokens before the text ids."""
    mask = int(conf["mask_token_id"])
    special = SpecialTokens(mask=mask, gmask=int(conf["gmask_token_id"]), smask=mask + 2, sop=int(conf["bos_token_id"]),
                            eop=int(conf["eos_token_id"]), eos=2 + offset, pad=int(conf.get("pad_token_id", 3)))
    two_d = bool(conf.get("position_encoding_2d", True))
    return ModelConfig(
        **{ours: int(conf[theirs]) for theirs, ours in CONFIG_KEYS.items()},
        inner_hidden_size=int(conf.get("inner_hidden_size") or 4 * int(conf["hidden_size"])),
        max_seq_len=int(conf.get("max_sequence_length", 2048)), layernorm_eps=float(conf.get("layernorm_epsilon", 1e-5)),
        special=special, position_encoding="2d" if two_d else "1d", mlp="gelu", tied_lm_head=False,
        chat_template="chatglm")


def _text_offset(root: Path, mask_id: int) -> int:
    """Image tokens before the text: tokenizer_config.json says it (num_image_tokens), else the mask id does."""
    tok_conf = root / "tokenizer_config.json"
    if tok_conf.is_file():
        try:
            value = json.loads(tok_conf.read_text()).get("num_image_tokens")
            if value is not None:
                return int(value)
        except json.JSONDecodeError:
            pass
    return max(0, mask_id - ICE_MASK_PIECE)


def hf_config(cfg: ModelConfig, quant_bits: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """The config.json ChatGLM-6B ships, for a model of this shape."""
    s = cfg.special
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads,
            "inner_hidden_size": cfg.inner_hidden_size, "vocab_size": cfg.vocab_size,
            "max_sequence_length": cfg.max_seq_len, "layernorm_epsilon": cfg.layernorm_eps,
            "position_encoding_2d": cfg.position_encoding == "2d", "mask_token_id": s.mask,
            "gmask_token_id": s.gmask, "bos_token_id": s.sop, "eos_token_id": s.eop, "pad_token_id": s.pad,
            "quantization_bit": quant_bits, "torch_dtype": {torch.float16: "float16", torch.bfloat16: "bfloat16",
                                                            torch.float32: "float32"}[dtype]}


def write_hf_checkpoint(dst: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], files: int = 1,
                        fmt: str = "bin", quant_bits: int = 0, num_image_tokens: int = 0,
                        naming: str = "chatglm") -> Path:
    """Save full tensors (glm-tp's names) in a Hugging Face layout (see write_hf_layout)."""
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    return write_hf_layout(dst, cfg, list(state), lambda names: {n: state[n] for n in names}, dtype, files, fmt,
                           quant_bits, num_image_tokens, naming)


def layout_config(cfg: ModelConfig, naming: str, quant_bits: int, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json of a clone whose tensors are named as `naming` (names.LAYOUTS) says."""
    if naming == "chatglm2":
        return chatglm2.chatglm2_config(cfg, quant_bits, dtype)
    if naming == "glm":
        return chatglm2.glm_config(cfg, dtype)
    return hf_config(cfg, quant_bits, dtype)


def write_hf_layout(dst: Path, cfg: ModelConfig, names: list[str],
                    tensors: Callable[[list[str]], dict[str, torch.Tensor]], dtype: torch.dtype, files: int = 1,
                    fmt: str = "safetensors", quant_bits: int = 0, num_image_tokens: int = 0,
                    naming: str = "chatglm") -> Path:
    """config.json and `files` weight files (`fmt` "bin" or "safetensors") with their index when there is more
    than one, the tensors under the names of `naming` (ChatGLM-6B's also get its tokenizer_config.json).
    `names` and `tensors(names)`, which gives one file's tensors, speak glm-tp's names: only one file's tensors
    are ever in memory."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(layout_config(cfg, naming, quant_bits, dtype), indent=2) + "\n")
    if naming == "chatglm":
        (dst / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": num_image_tokens}) + "\n")
    groups = [names[i::files] for i in range(files)] if files > 1 else [names]
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{files:05d}{suffix}" if files > 1 else f"{stem}{suffix}"
        part = {n: t.contiguous() for n, t in tensor_names.stored(tensors(group), cfg, naming).items()}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(part, str(dst / name))
        else:
            torch.save(part, dst / name)
        weight_map.update({n: name for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    if files > 1:
        (dst / f"{stem}{suffix}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return dst
