"""SwissArmyTransformer's GLM130B and ChatGLMModel, the reference implementations, made runnable on CPU.

Only for parity tests and side-by-side benchmarks (the optional `reference` extra); glm-tp never needs
it to run. SAT's GLM130B is CUDA/apex-era code: on CPU it needs a CPU "current device" and a bool
attention mask (patched here), and it only runs in fp16.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from glm_tp.config import ModelConfig


def available() -> bool:
    return importlib.util.find_spec("sat") is not None


def _glm130b_class():
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


def _sat_args(cfg: ModelConfig) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads, inner_hidden_size=cfg.inner_hidden_size,
        max_sequence_length=cfg.max_seq_len, layernorm_order="post", layernorm_epsilon=cfg.layernorm_eps,
        fp16=True, model_parallel_size=1, skip_init=True, hidden_dropout=0.0, attention_dropout=0.0,
        bos_token_id=cfg.special.sop, mask_token_id=cfg.special.mask, gmask_token_id=cfg.special.gmask,
        pad_token_id=cfg.special.pad)


def build_chatglm(cfg: ModelConfig) -> torch.nn.Module:
    """SAT's ChatGLMModel of this shape (one process, fp16); its LM head is `mixins.chatglm-final.lm_head`."""
    _glm130b_class()  # the same CPU patches
    from sat.model.official.chatglm_model import ChatGLMModel
    return ChatGLMModel(_sat_args(cfg)).half().eval()


def build(cfg: ModelConfig) -> torch.nn.Module:
    """The reference model of this shape (one process, fp16, weights left for the caller to load)."""
    args = _sat_args(cfg)
    args.position_encoding_2d, args.no_glu = False, False
    return _glm130b_class()(args).half().eval()


def mask(total: int, bidirectional: int) -> torch.Tensor:
    """The reference's attention mask for one sequence: [1, 1, total, total], True = masked."""
    visible = torch.ones(total, total).tril()
    visible[:, :bidirectional] = 1
    return (visible < 0.5).view(1, 1, total, total)
