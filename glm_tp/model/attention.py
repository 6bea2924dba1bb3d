"""Rotary position encoding, and how a layer's attention is computed on each device. The math is one:
softmax(q k^T / sqrt(d)) v with the softmax in fp32, under GLM's mask (True = hidden), on rotary-encoded
queries and keys; three ways to compute it:
- `reference_attention`: the reference's recipe in the model's dtype (CUDA, where decode steps are captured
  as CUDA graphs);
- torch's fused attention on CPU (`attend`): fp32 inside, the cache read as it is;
- on CPU, a decode step (one query per row) through one kernel call, the native library's
  (`kernels/native_attention`, on the thread pool of its GEMVs) or numba's (`kernels/cpu_attention`):
  rotary, the cache write and the attention in one call that reads each cached key and value in place
  (torch's fused attention reads a 1k-slot window of one row at under 2 GB/s, and the rotary and cache-write
  ops around it cost more than the kernel); grouped-query layers included, each query head reading its
  group's KV head. `decode_kernel` chooses it at load, after checking it against the torch ops
  (`decode_attention_reference`) on small cases.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from glm_tp.config import CPU_KERNELS, ModelConfig, check_kernels, dtype_name
from glm_tp.kernels import probe

MASK_FILL = -10000.0
PAIRS = 0  # `rotary_groups` of "half" rotary (kernels/cpu_attention takes the same code)

# (qkv, cos, sin, slots, the layer's cached keys, values, mask) -> the attention's output
DecodeKernel = Callable[..., torch.Tensor]


def rotary_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, d] (d: the head dim, or half of it for 2D positions), as the reference
    computes them whatever the model's dtype: inverse frequencies rounded to fp16, then angles, cos and sin in
    fp16 (integer positions are exact in fp16 up to 2048). The GLM models were trained with these values, so
    bf16/fp32 runs take them too. "half" (ChatGLM2): see `_half_tables`."""
    if cfg.position_encoding == "half":
        return _half_tables(cfg, dtype, device)
    d = cfg.head_dim // rotary_groups(cfg)
    inv_freq = (1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, device=device).float() / d))).half()
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float16)
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _half_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM2/GLM-4's rotary, for `apply_rotary_pairs`: the first half of the head dim rotates in pairs
    (x0, x1), (x2, x3), ... (each pair's angle repeated twice), computed in fp32 as their code does; the
    second half has cos 1 and sin 0, so it passes through exactly."""
    rot = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot, 2, device=device).float() / rot))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq).repeat_interleave(2, dim=-1)
    keep = torch.ones(cfg.max_seq_len, cfg.head_dim - rot, device=device)
    return (torch.cat([angles.cos(), keep], dim=-1).to(dtype),
            torch.cat([angles.sin(), keep * 0], dim=-1).to(dtype))


def apply_rotary_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]; cos/sin [b, 1, s, d]: dims (2i, 2i + 1) rotate together (interleaved pairs)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack([-odd, even], dim=-1).flatten(-2) * sin


def rotary_groups(cfg: ModelConfig) -> int:
    """How a head is rotated, as `rotate` and the CPU decode kernel take it: 1 (1D positions) or 2 (position,
    block position) NeoX blocks, or PAIRS ("half": ChatGLM2's interleaved pairs)."""
    if cfg.position_encoding == "half":
        return PAIRS
    return 2 if cfg.position_encoding == "2d" else 1


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """x [b, heads, s, d]; cos/sin [b, 1, s, d]. The head dim is `groups` blocks; in each, the first half
    pairs with the second (groups=1: dims [0, d/2) with [d/2, d))."""
    x1, x2 = x.unflatten(-1, (groups, 2, -1)).unbind(-2)
    return x * cos + torch.stack([-x2, x1], dim=-2).flatten(-3) * sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: int) -> torch.Tensor:
    """x rotated as `rotary_groups` says."""
    return apply_rotary_pairs(x, cos, sin) if rotary == PAIRS else apply_rotary(x, cos, sin, rotary)


def rotary_at(cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [b, 1, s, d] at positions [b, s] (1D) or [b, s, 2] (2D: the two tables' halves side by side)."""
    if positions.dim() == 3:
        return tuple(torch.cat([t[positions[..., 0]], t[positions[..., 1]]], dim=-1).unsqueeze(1)
                     for t in (cos_table, sin_table))
    return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, layer_id: int,
           layer_scaled: bool = True) -> torch.Tensor:
    """q [b, heads, s, d], keys/values [b, kv heads, window, d], mask [b, 1, s, window] -> [b, heads, s, d].
    With fewer KV heads (grouped-query attention) each serves heads/kv consecutive query heads.
    layer_scaled: on CUDA, the reference's recipe scaled by the layer (GLM-130B, ChatGLM-6B, trained with it);
    False (ChatGLM2/3, GLM-4): torch's fused attention on every device, as their own code computes it, which
    never holds a prefill's scores (a 32k-token prompt's would be 128 GiB)."""
    grouped = keys.shape[1] != q.shape[1]
    if q.device.type == "cpu" or not layer_scaled:
        # converting a long window to fp32 for two batched matmuls cost 2.3x per step at 1k tokens
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=~mask, scale=1 / math.sqrt(q.shape[-1]),
                                              enable_gqa=grouped)
    if grouped:
        keys, values = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (keys, values))
    return reference_attention(q, keys, values, mask, layer_id)


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                        layer_id: int) -> torch.Tensor:
    """The reference's attention in the model's dtype: q scaled down by c = layer + 1 so that half-precision
    scores cannot overflow, masked scores set to MASK_FILL, softmax(scores * c) in fp32. The CPU paths give
    masked keys the same weight, exactly 0; a query that sees no key at all (a pad slot of a left-padded
    `SeqLayout`, whose output is never read) gets 0 there instead of the mean of the values."""
    c = float(layer_id + 1)
    scores = torch.matmul(q / (math.sqrt(q.shape[-1]) * c), keys.transpose(-1, -2))
    scores = scores.masked_fill(mask, MASK_FILL)
    probs = torch.softmax(scores.float() * c, dim=-1).to(q.dtype)
    return torch.matmul(probs, values)


def decode_kernel(kernels: str, dtype: torch.dtype, device: torch.device, rotary: int = 1,
                  heads: int = 0) -> DecodeKernel | None:
    """The CPU decode-attention kernel for a layer's layout (heads 0: head-major QKV; else grouped [q ; k ; v]
    with `heads` query heads; rotary: `rotary_groups`): the native library's where it is built and passes its
    check (`native_decode_kernel`), else numba's, or None where `attend` serves every call: other devices and
    dtypes, kernels "torch"/"dequant", neither kernel here, or both failing their check (with a warning)."""
    check_kernels(kernels)
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or kernels not in CPU_KERNELS:
        return None
    kernel = native_decode_kernel(dtype, rotary, heads)
    if kernel is not None or not probe.numba_available():
        return kernel
    from glm_tp.kernels import cpu_attention

    name = "decode_attention_grouped" if heads else "decode_attention"
    if not probe.works(name, device, dtype_name(dtype),
                       lambda: _kernel_works(cpu_attention.decode_attention, dtype, grouped=heads > 0)):
        # shown once per message (Python's default warning filter), not once per layer
        warnings.warn("the numba decode-attention kernel failed its check here: using torch's attention")
        return None
    return functools.partial(cpu_attention.decode_attention, rotary=rotary, heads=heads)


def native_decode_kernel(dtype: torch.dtype, rotary: int, heads: int) -> DecodeKernel | None:
    """The native library's decode attention (kernels/native_attention), on the pool its GEMVs use, or None:
    the library not built, only its portable C path here while numba is installed (as for the GEMV,
    GLM_TP_NATIVE_ISA can ask for it), or its check failing here (with a warning)."""
    from glm_tp.kernels import native, native_attention

    isa = native.best_isa() if native.available() else None
    if isa is None or (isa == "scalar" and probe.numba_available() and not os.environ.get(native.ENV)):
        return None
    name = f"native-attention-{isa}" + ("-grouped" if heads else "")
    if not probe.works(name, torch.device("cpu"), dtype_name(dtype),
                       lambda: _kernel_works(native_attention.decode_attention, dtype, grouped=heads > 0)):
        warnings.warn("the native decode-attention kernel failed its check here: using numba's or torch's")
        return None
    return functools.partial(native_attention.decode_attention, rotary=rotary, heads=heads)


def split_qkv(qkv: torch.Tensor, kv_heads: int, head_dim: int, heads: int = 0) -> tuple[torch.Tensor, ...]:
    """q [b, heads, s, d] and k, v [b, kv heads, s, d] from a fused QKV output [b, s, width]: head-major
    (heads 0) or grouped [all q ; all k ; all v] with `heads` query heads."""
    b, s, _ = qkv.shape
    d = head_dim
    if heads:
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        return tuple(t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
    return qkv.view(b, s, kv_heads, 3 * d).transpose(1, 2).split(d, dim=-1)


def decode_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                               keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor, rotary: int,
                               heads: int = 0) -> torch.Tensor:
    """What a decode kernel must compute, as the model's torch ops (the arguments and result of
    `kernels/cpu_attention.decode_attention`): rotary, the step's key and value written into the cache at
    each row's slot, then `attend` over the window (grouped: each query head on its group's KV head)."""
    rows, kv_heads, _, d = keys.shape
    q, k, v = split_qkv(qkv, kv_heads, d, heads)
    q, k = rotate(q, cos, sin, rotary), rotate(k, cos, sin, rotary)
    at = slots.reshape(-1).expand(rows)
    for cache, new in zip((keys, values), (k, v)):
        cache[torch.arange(rows), :, at] = new[:, :, 0].to(cache.dtype)
    window = hidden.shape[-1]
    out = attend(q, keys[:, :, :window], values[:, :, :window], hidden, 0)
    return out.transpose(1, 2).reshape(rows, 1, q.shape[1] * d)


# the layouts the load-time check covers: (rotary, query heads, KV heads; query heads 0: head-major)
_CHECKED = {False: ((1, 0, 2), (2, 0, 2)), True: ((PAIRS, 4, 2), (PAIRS, 4, 1), (1, 2, 2))}


def _kernel_works(decode_attention: DecodeKernel, dtype: torch.dtype, grouped: bool) -> bool:
    """A kernel against the torch ops in fp32: 3 rows, a 40-slot cache, a 24-slot window; one row sees a
    prefix and its own slot, one a pad run, one nothing (the kernel must give 0 there, as torch does)."""
    gen = torch.Generator().manual_seed(0)
    d = 16
    slots = torch.arange(24)
    hidden = torch.stack([slots > 20, (slots < 5) | (slots > 17), torch.ones(24, dtype=torch.bool)])
    hidden = hidden.view(3, 1, 1, 24)
    at = torch.tensor([[20], [17], [23]])
    for rotary, heads, kv_heads in _CHECKED[grouped]:
        qkv = torch.randn(3, 1, ((heads or kv_heads) + 2 * kv_heads) * d, generator=gen).to(dtype)
        cos, sin = (torch.randn(3, 1, 1, d, generator=gen).to(dtype) for _ in range(2))
        cache = [torch.randn(3, kv_heads, 40, d, generator=gen).to(dtype) for _ in range(2)]
        want_cache = [t.float().clone() for t in cache]  # a copy even when dtype is fp32
        want = decode_attention_reference(qkv.float(), cos.float(), sin.float(), at, *want_cache, hidden, rotary, heads)
        got = decode_attention(qkv, cos, sin, at, *cache, hidden, rotary, heads).float()
        written = all(torch.allclose(g[torch.arange(3), :, at[:, 0]].float(), w[torch.arange(3), :, at[:, 0]],
                                     rtol=0.02, atol=0.05) for g, w in zip(cache, want_cache))
        if not (written and (got - want).abs().max() <= 0.02 * want.abs().max() + 0.02):
            return False
    return True
