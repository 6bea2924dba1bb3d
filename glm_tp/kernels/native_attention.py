"""A CPU decode step's attention by the native library (csrc/attention.c), on the thread pool its GEMVs
use: the arguments, result and computation of `cpu_attention.decode_attention` (the numba kernel), so a
decode step's GEMVs and attention run in one pool instead of waking numba's between them. Paths as the
GEMV's (native.best_isa: AVX-512, AVX2, portable C), equal up to fp32 rounding (attention.c).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from glm_tp.kernels import native

DTYPES = (torch.float32, torch.bfloat16)  # what the cache and the activations may hold (as numba's kernel)


@functools.cache
def _fn() -> ctypes._CFuncPtr:
    fn = native._load()[0].glm_decode_attention
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [c_int, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, c_int, c_int,
                   c_int, c_int, c_int, c_int, ptr, c_int]
    return fn


def _threads(keys: torch.Tensor, window: int) -> int:
    """torch's thread count, less where the window's keys and values are too few bytes to share out."""
    rows, kv_heads, _, d = keys.shape
    read = 2 * rows * kv_heads * window * d * keys.element_size()
    return max(1, min(torch.get_num_threads(), read // native.MIN_BYTES_PER_THREAD))


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor, rotary: int,
                     heads: int = 0, isa: str | None = None) -> torch.Tensor:
    """`cpu_attention.decode_attention` (same arguments and result) by the native library; isa: a
    native.ISAS path, else the one calls take (native.best_isa)."""
    rows, kv_heads, cache_slots, d = keys.shape
    grouped, heads = heads > 0, heads or kv_heads
    if heads % kv_heads or qkv.shape[-1] != (heads + 2 * kv_heads) * d:
        raise ValueError(f"qkv of width {qkv.shape[-1]} is not {heads} query and {kv_heads} KV heads of {d}")
    if qkv.dtype not in DTYPES or keys.dtype not in DTYPES or values.dtype != keys.dtype:
        raise TypeError(f"native decode attention takes fp32 or bf16, not {qkv.dtype} with a {keys.dtype} cache")
    if keys.stride() != values.stride() or keys.stride(3) != 1 or keys.stride(2) != d:
        raise ValueError("native decode attention needs a cache whose slots are contiguous rows of d")
    flat = qkv.reshape(rows, -1).contiguous()
    trig = [t.reshape(rows, d).contiguous() for t in (cos, sin)]
    if trig[0].dtype not in DTYPES:
        trig = [t.float() for t in trig]
    at = slots.reshape(-1).expand(rows).to(torch.int64).contiguous()
    mask = hidden.reshape(rows, -1).contiguous().view(torch.uint8)
    window = mask.shape[1]
    out = torch.empty(rows, heads * d, dtype=qkv.dtype)
    bf16 = torch.bfloat16
    if _fn()(native._isa_id(isa), flat.data_ptr(), trig[0].data_ptr(), trig[1].data_ptr(), at.data_ptr(),
             keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), cache_slots, mask.data_ptr(),
             rows, kv_heads, d, window, heads, int(grouped), rotary, int(qkv.dtype == bf16),
             int(trig[0].dtype == bf16), int(keys.dtype == bf16), out.data_ptr(), _threads(keys, window)):
        raise ValueError(f"glm_decode_attention refused its arguments (a slot outside the {cache_slots}-slot "
                         f"cache, a window of {window}, head dim {d} for rotary {rotary})")
    return out.view(rows, 1, heads * d)
