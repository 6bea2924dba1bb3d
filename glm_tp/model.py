"""The GLM-130B transformer, one tensor-parallel rank of it.

Per layer (DeepNorm, post-LN, alpha = sqrt(2 * num_layers)):
    h = LN_in(x);   x' = alpha*h + Attention(h)
    m = LN_post(x'); y = alpha*m + GeGLU(m)
and after the last layer: logits = LN_final(y) @ E^T with the tied, vocab-parallel embedding E.

Attention: head-major fused QKV, NeoX-style rotary over the whole head dim at caller-given
position ids, q scaled by 1/(sqrt(d)*c) and softmax(scores*c) in fp32 with c = layer+1, masked
scores filled with -10000. The mask is GLM's: every query sees the first `bidirectional` tokens
of its sequence, and the rest causally. Sequences of different lengths are left-padded, and pad
slots are never visible. Keys and values live in a preallocated `KVCache` written in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dist import TPContext
from .layers import ColumnParallelLinear, GLUColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

MASK_FILL = -10000.0


@dataclass
class SeqLayout:
    """Where each sequence's tokens sit in the cache: `pad` left-padding slots, then a context
    whose first `bidirectional` tokens every later query may see."""

    pad: torch.Tensor            # [b] long
    bidirectional: torch.Tensor  # [b] long

    def mask(self, start: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """[b, 1, q_len, k_len] bool, True = masked (the reference's convention)."""
        keys = torch.arange(k_len, device=device).view(1, 1, k_len)
        queries = torch.arange(start, start + q_len, device=device).view(1, q_len, 1)
        pad = self.pad.to(device).view(-1, 1, 1)
        visible = (keys < pad + self.bidirectional.to(device).view(-1, 1, 1)) | (keys <= queries)
        return ~(visible & (keys >= pad)).unsqueeze(1)


class KVCache:
    """Keys (after rotary) and values for every layer: [layers, batch, heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, tp_size: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_layers, batch, cfg.num_heads // tp_size, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, n: int) -> "KVCache":
        """The first `n` rows, sharing this cache's memory (a fill uses as many rows as it has sequences)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        return view

    def reorder(self, index: torch.Tensor, upto: int | None = None) -> None:
        """Keep rows `index` of the batch (beam search picks parents); only slots [0, upto) are moved."""
        k, v = self.k[:, :, :, :upto], self.v[:, :, :, :upto]
        k.copy_(k.index_select(1, index))
        v.copy_(v.index_select(1, index))


def rotary_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim], as the reference computes them whatever the model's dtype:
    inverse frequencies rounded to fp16, then angles, cos and sin in fp16 (integer positions are exact in
    fp16 up to 2048). GLM-130B was trained with these values, so bf16/fp32 runs take them too."""
    d = cfg.head_dim
    inv_freq = (1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, device=device).float() / d))).half()
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float16)
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]; cos/sin [b, 1, s, d]. Dims [0, d/2) pair with [d/2, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPContext, dtype: torch.dtype, bits: int):
        super().__init__()
        self.layer_id = layer_id
        self.heads = cfg.num_heads // tp.size
        self.head_dim = cfg.head_dim
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, tp, dtype, bits)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp, dtype, bits)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, slots: torch.Tensor, window: int) -> torch.Tensor:
        b, s, _ = h.shape
        qkv = self.query_key_value(h).view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:  # one-shot forward (training): nothing to keep
            keys, values = k, v
        else:  # write this call's keys/values at `slots` in place, attend over the first `window` slots
            keys, values = cache.k[self.layer_id], cache.v[self.layer_id]
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            keys, values = keys[:, :, :window], values[:, :, :window]

        c = float(self.layer_id + 1)
        # CPUs without half-precision arithmetic run half batched matmuls as slow loops: use fp32 there
        work = torch.float32 if h.device.type == "cpu" else h.dtype
        scores = torch.matmul((q / (math.sqrt(self.head_dim) * c)).to(work), keys.transpose(-1, -2).to(work))
        scores = scores.masked_fill(mask, MASK_FILL)
        probs = torch.softmax(scores.float() * c, dim=-1).to(work)
        ctx = torch.matmul(probs, values.to(work)).to(h.dtype)
        return self.dense(ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class GeGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype, bits: int):
        super().__init__()
        self.dense_h_to_4h = GLUColumnParallelLinear(cfg.hidden_size, 2 * cfg.inner_hidden_size, tp, dtype, bits)
        self.dense_4h_to_h = RowParallelLinear(cfg.inner_hidden_size, cfg.hidden_size, tp, dtype, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(value * F.gelu(gate))


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPContext, dtype: torch.dtype, bits: int):
        super().__init__()
        self.alpha = cfg.deepnorm_alpha
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, dtype=dtype)
        self.attention = SelfAttention(cfg, layer_id, tp, dtype, bits)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, dtype=dtype)
        self.mlp = GeGLU(cfg, tp, dtype, bits)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, slots: torch.Tensor, window: int) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = self.alpha * h + self.attention(h, cos, sin, mask, cache, slots, window)
        m = self.post_attention_layernorm(x)
        return self.alpha * m + self.mlp(m)


class Transformer(nn.Module):
    """Holds the parameters under the release checkpoint's names (`transformer.*`)."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype, bits: int):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype)
        self.layers = nn.ModuleList(GLMBlock(cfg, i, tp, dtype, bits) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, dtype=dtype)


class GLMModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, quant_bits: int = 0):
        super().__init__()
        cfg.check_tp(tp.size)
        self.cfg, self.tp, self.dtype, self.quant_bits = cfg, tp, dtype, quant_bits
        self.device = torch.device(device) if device is not None else tp.device
        with self.device:  # parameters are allocated, never written: the loader fills them
            self.transformer = Transformer(cfg, tp, dtype, quant_bits)
        self.requires_grad_(False)
        cos, sin = rotary_tables(cfg, dtype, self.device)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def prepare_kernels(self, kernels: str = "fused", lm_head: str = "model") -> None:
        """Lay quantized weights out for the device's kernels (once, after loading; kernels: see
        quant.KERNELS, "dequant" keeps the reference's dequantize-then-matmul); lm_head "int8" multiplies the
        logits by an INT8 copy of the embedding."""
        for module in self.modules():
            if getattr(module, "bits", 0):
                module.prepare_(kernels)
        self.transformer.word_embeddings.prepare_head_(lm_head, kernels)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, self.tp.size, batch, max_len or self.cfg.max_seq_len, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, layout: SeqLayout, cache: KVCache | None,
                start: int = 0, logits_at: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor | None:
        """Run `tokens` [b, s] (cache slots start..start+s) and return logits at `logits_at`.

        logits_at: [b] or [b, n] indexes into this call's s tokens (default: the last one).
        Returns the full-vocab logits [b, (n,) V] on rank 0 and None elsewhere; with
        gather=False each rank returns its own vocab slice. Callers wrap inference in
        torch.inference_mode(); training (tools/train_demo.py) runs the same code with autograd.
        """
        s = tokens.shape[1]
        if cache is not None and start + s > cache.max_len:
            raise ValueError(f"sequence of {start + s} tokens exceeds the cache's {cache.max_len}")
        slots = torch.arange(start, start + s, device=self.device)
        mask = layout.mask(start, s, start + s, self.device)
        return self.run(tokens, positions, mask, cache, slots, start + s, logits_at, gather)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache | None,
            slots: torch.Tensor, window: int, logits_at: torch.Tensor | None = None,
            gather: bool = True) -> torch.Tensor | None:
        """`forward` on inputs already on the device: tokens and positions [b, s], the mask [b, 1, s, window]
        (True = hidden), the cache slots [s] this call writes. It does no host work, so a decode step made
        of it can be captured in a CUDA graph (see decode.py)."""
        cos = self.rotary_cos[positions].unsqueeze(1)
        sin = self.rotary_sin[positions].unsqueeze(1)
        x = self.transformer.word_embeddings(tokens)
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, mask, cache, slots, window)
        if logits_at is None:
            picked = x[:, -1]
        else:
            b = x.shape[0]
            picked = x[torch.arange(b, device=self.device).view(-1, *([1] * (logits_at.dim() - 1))), logits_at]
        local = self.transformer.word_embeddings.logits(self.transformer.final_layernorm(picked))
        return self.tp.gather_last_dim_to_first(local) if gather else local
