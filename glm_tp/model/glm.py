"""The GLM transformer (GLM-130B, ChatGLM-6B, ChatGLM2/3, GLM-4), one tensor-parallel rank of it.

Per layer (DeepNorm, post-LN, alpha = sqrt(2 * num_layers)):
    h = LN_in(x);   x' = alpha*h + Attention(h)
    m = LN_post(x'); y = alpha*m + MLP(m)
or (norm "rmsnorm", ChatGLM2 on): pre-LN with RMSNorm, x' = x + Attention(RMS_in(x)), y = x' + MLP(RMS_post(x')),
and after the last layer: logits = LN_final(y) @ E^T with the tied, vocab-parallel embedding E
(or a separate vocab-parallel `lm_head` when `tied_lm_head` is off).

The config picks the family's variants: MLP GeGLU (GLM-130B), tanh-GeLU without gate (ChatGLM-6B) or
SwiGLU (ChatGLM2); rotary over the whole head dim at 1D positions [b, s], 2D (ChatGLM-6B): positions
[b, s, 2] as (position, block position), each rotating its own half of the head dim, or "half" (ChatGLM2):
1D, the first half of the head dim in interleaved pairs; grouped-query attention (`kv_groups`), whose
QKV is [all q ; all k ; all v] and whose cache holds the rank's KV heads only; which linears have a bias.

Attention: head-major fused QKV, NeoX-style rotary at caller-given position ids, softmax(q k^T / sqrt(d)) in
fp32 (how each device computes it: attention.py). The mask is GLM's: every query sees the first
`bidirectional` tokens of its sequence, and the rest causally (masks.py). `SeqLayout` may put pad slots
before a sequence, never visible; the serving engine instead right-pads each row from slot 0
(engine/decoder.py). Keys and values live in a preallocated `KVCache` written in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm_tp.config import ModelConfig
from glm_tp.kernels import quant
from glm_tp.model import attention
from glm_tp.model.attention import rotary_at, rotary_groups, rotary_tables
from glm_tp.model.masks import glm_mask
from glm_tp.parallel.dist import TPContext
from glm_tp.parallel.layers import (
    ColumnParallelLinear,
    GLUColumnParallelLinear,
    GroupedQKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from glm_tp.parallel.partition import GroupedQKV
from glm_tp.parallel.pipeline import Outbox, Stage, recv, send


@dataclass
class SeqLayout:
    """Where each sequence's tokens sit in the cache: `pad` left-padding slots, then a context
    whose first `bidirectional` tokens every later query may see."""

    pad: torch.Tensor            # [b] long
    bidirectional: torch.Tensor  # [b] long

    def mask(self, start: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """[b, 1, q_len, k_len] bool, True = masked (the reference's convention), for queries at slots
        start..start+q_len."""
        queries = torch.arange(start, start + q_len, device=device)
        return glm_mask(queries, k_len, self.bidirectional.to(device), self.pad.to(device))


class KVCache:
    """Keys (after rotary) and values for every layer: [layers, batch, the rank's KV heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, tp_size: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, layers: int | None = None):
        shape = (layers or cfg.num_layers, batch, cfg.kv_heads_per_rank(tp_size), max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def select(self, row: int, n: int) -> "KVCache":
        """Rows [row, row + n), sharing this cache's memory (a prefill writes only its own rows)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, row:row + n], self.v[:, row:row + n]
        return view

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, upto: int) -> None:
        """Rows dst become copies of rows src over slots [0, upto) (beam parents, packing rows)."""
        for t in (self.k, self.v):
            part = t[:, :, :, :upto]
            part.index_copy_(1, dst.to(t.device), part.index_select(1, src.to(t.device)))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store a call's keys/values [b, heads, s, d] in place: at slots [s] shared by every row (a
        prompt), or at each row's own slots [b, s] (a decode step over rows of different lengths, a prompt
        after a cached prefix)."""
        keys, values = self.k[layer], self.v[layer]
        if slots.dim() == 1:
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            return
        rows = torch.arange(k.shape[0], device=k.device).view(-1, 1)
        keys.transpose(1, 2).index_put_((rows, slots), k.transpose(1, 2))
        values.transpose(1, 2).index_put_((rows, slots), v.transpose(1, 2))

    def load_blocks(self, pool: KVCache, blocks: torch.Tensor, row: int) -> None:
        """Slots [0, n * block) of `row` become the pool's rows `blocks` (n of them, `block` slots each)."""
        n, block = len(blocks), pool.max_len
        for t, p in ((self.k, pool.k), (self.v, pool.v)):
            held = p.index_select(1, blocks.to(p.device)).transpose(1, 2)  # [layers, heads, n, block, d]
            t[:, row, :, :n * block] = held.reshape(t.shape[0], t.shape[2], n * block, t.shape[4])

    def save_blocks(self, pool: KVCache, blocks: torch.Tensor, numbers: list[int], row: int) -> None:
        """The pool's rows `blocks` become block `numbers[i]` (slots [i * block, (i + 1) * block)) of `row`."""
        block = pool.max_len
        for t, p in ((self.k, pool.k), (self.v, pool.v)):
            parts = [t[:, row, :, i * block:(i + 1) * block] for i in numbers]  # [layers, heads, block, d]
            p.index_copy_(1, blocks.to(p.device), torch.stack(parts, 1))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPContext, dtype: torch.dtype, bits: int,
                 cache_layer: int | None = None):
        """cache_layer: this layer's index in the KV cache (a pipeline stage caches its own layers only)."""
        super().__init__()
        self.layer_id, self.dtype = layer_id, dtype
        self.cache_layer = layer_id if cache_layer is None else cache_layer
        self.rotary_groups = rotary_groups(cfg)
        self.layer_scaled = not cfg.causal  # which attention recipe the family was trained with (attend)
        self.heads, self.kv_heads = cfg.num_heads // tp.size, cfg.kv_heads_per_rank(tp.size)
        self.head_dim = cfg.head_dim
        h, bias = cfg.hidden_size, cfg.bias == "all"
        if cfg.kv_groups:
            cut = GroupedQKV(cfg.num_heads, cfg.kv_groups, cfg.head_dim)
            self.query_key_value = GroupedQKVParallelLinear(h, cut, tp, dtype, bits)
        else:
            self.query_key_value = ColumnParallelLinear(h, 3 * h, tp, dtype, bits)
        self.dense = RowParallelLinear(h, h, tp, dtype, bits, bias=bias)
        self.decode_kernel: attention.DecodeKernel | None = None  # set by prepare_

    def prepare_(self, kernels: str = "fused") -> None:
        """Choose how decode steps attend (see attention.decode_kernel); once, after loading."""
        self.decode_kernel = attention.decode_kernel(kernels, self.dtype, self.dense.weight.device,
                                                     self.rotary_groups, self.grouped_heads)

    @property
    def grouped_heads(self) -> int:
        """The rank's query heads when QKV is grouped [q ; k ; v], 0 when head-major."""
        return self.heads if isinstance(self.query_key_value, GroupedQKVParallelLinear) else 0

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, heads, s, d] and k, v [b, kv heads, s, d]: head-major (MHA) or [q ; k ; v] (grouped)."""
        return attention.split_qkv(qkv, self.kv_heads, self.head_dim, self.grouped_heads)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, slots: torch.Tensor, window: int) -> torch.Tensor:
        b, s, _ = h.shape
        qkv = self.query_key_value(h)
        if s == 1 and cache is not None and self.decode_kernel is not None:  # a CPU decode step: one call
            return self.dense(self.decode_kernel(qkv, cos, sin, slots, cache.k[self.cache_layer],
                                                 cache.v[self.cache_layer], mask))
        q, k, v = self.split_heads(qkv)
        q, k = (attention.rotate(t, cos, sin, self.rotary_groups) for t in (q, k))
        if cache is None:  # one-shot forward (training): nothing to keep
            ctx = attention.attend(q, k, v, mask, self.layer_id, self.layer_scaled)
        else:  # write this call's keys/values at `slots` in place, attend over the first `window` slots
            cache.write(self.cache_layer, k, v, slots)
            keys, values = cache.k[self.cache_layer, :, :, :window], cache.v[self.cache_layer, :, :, :window]
            ctx = attention.attend(q, keys, values, mask, self.layer_id, self.layer_scaled)
        return self.dense(ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    """GeGLU (value * gelu(gate), exact GeLU), SwiGLU (silu(gate) * up) or, without a gate, the
    tanh-approximated GeLU of ChatGLM-6B. On CPU, the activation (and the h->4h bias) is fused into the
    h->4h GEMV of a decode batch where its kernel has it (kernels/quant.fused_activation)."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype, bits: int):
        super().__init__()
        self.kind, self.dtype = cfg.mlp, dtype
        h, f, bias = cfg.hidden_size, cfg.inner_hidden_size, cfg.bias == "all"
        self.dense_h_to_4h = (GLUColumnParallelLinear(h, 2 * f, tp, dtype, bits, bias) if cfg.glu
                              else ColumnParallelLinear(h, f, tp, dtype, bits, bias))
        self.dense_4h_to_h = RowParallelLinear(f, h, tp, dtype, bits, bias)
        self.fused = False  # set by prepare_

    def prepare_(self, kernels: str = "fused") -> None:
        """Whether the activation fuses into the CPU GEMV; once, after loading."""
        self.fused = quant.fused_activation(kernels, self.kind, self.dtype, self.dense_4h_to_h.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.dense_h_to_4h
        fused = up.prepared.activated(x, up.bias, self.kind) if self.fused and up.prepared is not None else None
        if fused is not None:
            return self.dense_4h_to_h(fused)
        if self.kind == "gelu":
            return self.dense_4h_to_h(F.gelu(up(x), approximate="tanh"))
        if self.kind == "swiglu":  # ChatGLM2's rows: gate, then up
            return self.dense_4h_to_h(quant.swiglu(up(x)))
        first, second = up(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(first * F.gelu(second))  # GeGLU's rows: value, then gate


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and rounded to the input's dtype before the gain, as ChatGLM2
    and transformers' GLM compute it."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.layernorm_eps, dtype)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, dtype=dtype)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPContext, dtype: torch.dtype, bits: int,
                 cache_layer: int | None = None):
        super().__init__()
        self.pre_ln = cfg.norm == "rmsnorm"
        self.alpha = cfg.deepnorm_alpha
        self.input_layernorm = make_norm(cfg, dtype)
        self.attention = SelfAttention(cfg, layer_id, tp, dtype, bits, cache_layer)
        self.post_attention_layernorm = make_norm(cfg, dtype)
        self.mlp = MLP(cfg, tp, dtype, bits)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, slots: torch.Tensor, window: int) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attention(self.input_layernorm(x), cos, sin, mask, cache, slots, window)
            return x + self.mlp(self.post_attention_layernorm(x))
        # the scaled residual as one op (alpha * h + y): two fewer small ops per layer in a decode step
        h = self.input_layernorm(x)
        x = torch.add(self.attention(h, cos, sin, mask, cache, slots, window), h, alpha=self.alpha)
        m = self.post_attention_layernorm(x)
        return torch.add(self.mlp(m), m, alpha=self.alpha)


class Elsewhere(nn.Module):
    """A layer another pipeline stage holds: keeps the layer numbering (and so the tensor names) of the model."""


class Transformer(nn.Module):
    """Holds the parameters under the release checkpoint's names (`transformer.*`): all of them, or a pipeline
    stage's share (its layers; the embedding on the first stage, and on the last when the head is tied; the
    final norm on the last)."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype, bits: int, stage: Stage | None = None):
        super().__init__()
        own = stage.layers if stage else range(cfg.num_layers)
        if stage is None or stage.holds("transformer.word_embeddings.weight", cfg.tied_lm_head):
            self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype)
        self.layers = nn.ModuleList(GLMBlock(cfg, i, tp, dtype, bits, i - own.start) if i in own else Elsewhere()
                                    for i in range(cfg.num_layers))
        self.own = own
        if stage is None or stage.is_last:
            self.final_layernorm = make_norm(cfg, dtype)


class GLMModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, quant_bits: int = 0, stage: Stage | None = None,
                 world: TPContext | None = None):
        """tp: this rank's tensor-parallel group (a pipeline stage's); stage: its pipeline stage (None: the
        whole model); world: every rank (the engine's broadcasts), by default tp."""
        super().__init__()
        cfg.check_tp(tp.size)
        self.cfg, self.tp, self.dtype, self.quant_bits = cfg, tp, dtype, quant_bits
        self.stage, self.world = stage, world or tp
        # set by an engine that keeps several micro-batches in flight (engine/lanes.py): activations go on
        # through `outbox` without blocking, and the last stage returns its logits for the engine to send
        self.outbox: Outbox | None = None
        self.device = torch.device(device) if device is not None else tp.device
        with self.device:  # parameters are allocated, never written: the loader fills them
            self.transformer = Transformer(cfg, tp, dtype, quant_bits, stage)
            # the LM head: the embedding itself (tied) or its own vocab-parallel weight (ChatGLM-6B)
            untied = not cfg.tied_lm_head and (stage is None or stage.is_last)
            self.lm_head = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype) if untied else None
        self.requires_grad_(False)
        cos, sin = rotary_tables(cfg, dtype, self.device)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def prepare_kernels(self, kernels: str = "fused", lm_head: str = "model") -> None:
        """Lay weights out for the device's kernels (once, after loading; kernels: see config.KERNELS,
        "dequant" keeps the reference's dequantize-then-matmul); lm_head "int8" multiplies the logits by an
        INT8 copy of the LM head (the embedding, when the two are tied)."""
        for module in self.modules():
            if hasattr(module, "prepare_"):
                module.prepare_(kernels)
        if self.stage is None or self.stage.is_last:
            (self.lm_head or self.transformer.word_embeddings).prepare_head_(lm_head, kernels)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, self.tp.size, batch, max_len or self.cfg.max_seq_len, self.dtype, self.device,
                       len(self.transformer.own))

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
        """`forward` on inputs already on the device: tokens [b, s], positions [b, s] or [b, s, 2] (2D), the mask
        [b, 1, s, window] (True = hidden), the cache slots this call writes ([s], or [b, 1]: each row's own slot).
        It does no host work, so a decode step made
        of it can be captured in a CUDA graph (see engine/decoder.py). With `outbox` set, a stage's send does
        not wait for its receiver, rank 0 does not wait for the logits here, and the last stage's TP rank 0
        returns them."""
        cos, sin = rotary_at(self.rotary_cos, self.rotary_sin, positions)
        stage = self.stage
        if stage is None or stage.is_first:
            x = self.transformer.word_embeddings(tokens)
        else:  # the previous stage's output: the same rows and tokens
            x = recv(torch.empty(*tokens.shape, self.cfg.hidden_size, dtype=self.dtype, device=self.device),
                     stage.previous)
        for i in self.transformer.own:
            x = self.transformer.layers[i](x, cos, sin, mask, cache, slots, window)
        if stage is not None and not stage.is_last:
            if self.outbox is not None:
                self.outbox.post(x, stage.next)
                return None
            send(x, stage.next)
            return self._logits_from_last_stage(tokens.shape[0], logits_at) if gather else None
        if logits_at is None:
            picked = x[:, -1]
        else:
            b = x.shape[0]
            picked = x[torch.arange(b, device=self.device).view(-1, *([1] * (logits_at.dim() - 1))), logits_at]
        head = self.lm_head or self.transformer.word_embeddings
        local = head.logits(self.transformer.final_layernorm(picked))
        if not gather:
            return local
        logits = self.tp.gather_last_dim_to_first(local)
        if stage is not None and logits is not None and not stage.is_first and self.outbox is None:  # to rank 0
            send(logits.float(), 0)
            return None
        return logits

    def _logits_from_last_stage(self, rows: int, logits_at: torch.Tensor | None) -> torch.Tensor | None:
        """World rank 0 receives the full-vocab logits (fp32) the last stage computed; other ranks get None."""
        if self.stage.rank != 0:
            return None
        shape = (rows, *(logits_at.shape[1:] if logits_at is not None else ()), self.cfg.vocab_size)
        return recv(torch.empty(shape, dtype=torch.float32, device=self.device), self.stage.last_stage_lead)
