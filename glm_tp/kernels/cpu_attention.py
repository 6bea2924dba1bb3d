"""A decode step's attention on CPU (one query per row), compiled by numba (the optional `cpu` extra).

One call per layer does what the torch ops do in several: rotary on the query and the new key, the key and
value written into the cache at each row's slot, then scores, softmax and the weighted sum of values in fp32
against the cache as it is (float32 or bf16 bits), reading each cached key and value in place. Two layouts
of the fused QKV output:
- head-major (GLM-130B, ChatGLM-6B): each head's q, k, v side by side, one KV head per query head;
- grouped (ChatGLM2/3, GLM-4): [all q ; all k ; all v], `heads` query heads over the cache's KV heads, each
  query head reading the KV head of its group (heads / kv heads consecutive query heads per KV head) from the
  cache itself: no repeated or expanded copy of the keys and values. A task serves up to 4 query heads of a
  group, reading each cached key and value once for all of them.
Rotary: `rotary` 1 or 2 blocks per head, in each the first half pairing with the second (NeoX), or
`PAIRS`: dims (2i, 2i + 1) rotate together (ChatGLM2's interleaved pairs). The cos/sin rows are taken as
given, so ChatGLM2's pass-through second half (cos 1, sin 0) comes out exact.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from glm_tp.kernels.cpu import _as_f32, _exp, _numpy, _put

PAIRS = 0  # `rotary` for interleaved pairs; 1 or 2: NeoX halves in that many blocks per head


@njit(fastmath=True, inline="always")
def _rotated(qkv, r, base, e, cos, sin, half):
    """Element e of the head vector at qkv[r, base:], rotated (half 0: interleaved pairs)."""
    if half == 0:
        partner, sign = (e + 1, np.float32(-1)) if e % 2 == 0 else (e - 1, np.float32(1))
    elif (e // half) % 2 == 0:
        partner, sign = e + half, np.float32(-1)
    else:
        partner, sign = e - half, np.float32(1)
    return (_as_f32(qkv[r, base + e]) * _as_f32(cos[r, e])
            + _as_f32(qkv[r, base + partner]) * sign * _as_f32(sin[r, e]))


@njit(fastmath=True, inline="always")
def _store_kv(qkv, cos, sin, slots, k, v, r, g, k_base, v_base, half):
    kc, vc, slot = k[r, g], v[r, g], slots[r]
    for e in range(k.shape[3]):
        _put(kc, slot, e, _rotated(qkv, r, k_base, e, cos, sin, half))
        _put(vc, slot, e, _as_f32(qkv[r, v_base + e]))


@njit(fastmath=True, inline="always")
def _heads_per_task(per):
    # the query heads of one group a task serves together, reading each cached key and value once for them
    return 4 if per % 4 == 0 else 2 if per % 2 == 0 else 1


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def attention_kernel(qkv, cos, sin, slots, k, v, hidden, rotary, heads, grouped, out):
    # qkv: [rows, width]; cos, sin: [rows, d]; slots: [rows], where each row's key and value go; k, v: a
    # layer's cache [rows, kv heads, slots, d]; hidden: [rows, window], True = masked; out: [rows, heads * d].
    # A query that sees no key gets 0 (as torch's attention gives it)
    rows, kv_heads, _, d = k.shape
    window = hidden.shape[1]
    per = heads // kv_heads
    hb = _heads_per_task(per)
    blocks = per // hb  # tasks per KV head
    half = 0 if rotary == 0 else d // (2 * rotary)
    q_step, kv_step = (d, d) if grouped else (3 * d, 3 * d)
    k0, v0 = (heads * d, (heads + kv_heads) * d) if grouped else (d, 2 * d)
    scale = np.float32(1 / np.sqrt(np.float32(d)))
    if blocks > 1:  # a KV head serves several tasks: written once, before any of them reads it
        for task in range(rows * kv_heads):
            r, g = task // kv_heads, task % kv_heads
            _store_kv(qkv, cos, sin, slots, k, v, r, g, k0 + g * kv_step, v0 + g * kv_step, half)
    for task in prange(rows * kv_heads * blocks):
        r, g, h0 = task // (kv_heads * blocks), (task // blocks) % kv_heads, (task % (kv_heads * blocks)) * hb
        if blocks == 1:
            _store_kv(qkv, cos, sin, slots, k, v, r, g, k0 + g * kv_step, v0 + g * kv_step, half)
        kc, vc = k[r, g], v[r, g]
        qf = np.empty((hb, d), np.float32)
        for i in range(hb):
            for e in range(d):
                qf[i, e] = _rotated(qkv, r, (h0 + i) * q_step, e, cos, sin, half) * scale
        scores = np.zeros((hb, window), np.float32)
        top = np.full(hb, -np.inf, np.float32)
        row = np.empty(d, np.float32)
        for j in range(window):
            if not hidden[r, j]:
                for e in range(d):
                    row[e] = _as_f32(kc[j, e])
                for i in range(hb):
                    acc = np.float32(0)
                    for e in range(d):
                        acc += qf[i, e] * row[e]
                    scores[i, j] = acc
                    top[i] = max(top[i], acc)
        acc_v = np.zeros((hb, d), np.float32)
        total = np.zeros(hb, np.float32)
        if top[0] > -np.inf:  # the row sees a key (the mask is per row: every head sees the same keys)
            for i in range(hb):  # a vectorized exp over the window (hidden slots' values are never used)
                t = top[i]
                for j in range(window):
                    scores[i, j] = _exp(scores[i, j] - t)
            for j in range(window):
                if not hidden[r, j]:
                    for e in range(d):
                        row[e] = _as_f32(vc[j, e])
                    for i in range(hb):
                        p = scores[i, j]
                        total[i] += p
                        for e in range(d):
                            acc_v[i, e] += p * row[e]
        for i in range(hb):
            inv = np.float32(1) / total[i] if total[i] > 0 else np.float32(0)
            for e in range(d):
                _put(out, r, (h0 + i) * d + e, acc_v[i, e] * inv)


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor, rotary: int,
                     heads: int = 0) -> torch.Tensor:
    """A decode step's attention, one query per row: rotary on the query and key, the key and value written
    into the cache at each row's slot, then softmax(q k^T / sqrt(d)) v over the window.
    qkv [rows, 1, width]: head-major (heads 0: one query head per cached KV head) or grouped [q ; k ; v] with
    `heads` query heads; cos, sin [rows, 1, 1, d]; slots [rows, 1] (or [1]: one slot for every row);
    keys/values a layer's whole cache [rows, kv heads, slots, d] (float32 or bf16, as qkv); hidden
    [rows, 1, 1, window] bool, True = masked: the window is the first `window` slots; rotary: 1, 2 or PAIRS.
    Returns [rows, 1, heads * d]."""
    rows, kv_heads, _, d = keys.shape
    grouped, heads = heads > 0, heads or kv_heads
    if heads % kv_heads or qkv.shape[-1] != (heads + 2 * kv_heads) * d:
        raise ValueError(f"qkv of width {qkv.shape[-1]} is not {heads} query and {kv_heads} KV heads of {d}")
    out = torch.empty(rows, heads * d, dtype=qkv.dtype)
    attention_kernel(_numpy(qkv.reshape(rows, -1).contiguous()), _numpy(cos.reshape(rows, d).contiguous()),
                     _numpy(sin.reshape(rows, d).contiguous()), slots.reshape(-1).expand(rows).contiguous().numpy(),
                     _numpy(keys), _numpy(values), hidden.reshape(rows, -1).contiguous().numpy(), rotary, heads,
                     grouped, _numpy(out))
    return out.view(rows, 1, heads * d)
