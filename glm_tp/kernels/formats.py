"""The quantized weight format, bit-compatible with the GLM-130B release tools (a leaf: torch only).

Symmetric, one fp16 scale per output row of the rank's shard, scale = absmax/127 (INT8) or absmax/7
(INT4), and q = round(w / scale) computed in fp16 as the reference does. INT4 values are packed two per
int8 byte along the input dim, the even column in the high nibble.
"""
from __future__ import annotations

import torch


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 8 or 4, not {bits}")
    return 2 ** (bits - 1) - 1


def quantize_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in] or packed [out, in/2], fp16 scale [out])."""
    w16 = w.to(torch.float16)
    scale = (w16.abs().amax(dim=-1) / qmax(bits)).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
    q = torch.round(w16 / safe[:, None]).clamp_(-qmax(bits), qmax(bits)).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> [out, in/2]; column 2j high nibble, 2j+1 low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even input dim, got {q.shape[-1]}")
    hi, lo = q[..., 0::2], q[..., 1::2]
    return ((hi << 4) | (lo & 0xF)).to(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`, sign-extending each nibble with arithmetic shifts."""
    hi = p >> 4
    lo = (p << 4) >> 4
    return torch.stack([hi, lo], dim=-1).flatten(-2)


def int_values(q: torch.Tensor, bits: int) -> torch.Tensor:
    """A stored weight's integer values, one per input column (INT4 unpacked)."""
    return unpack_int4(q) if bits == 4 else q


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return int_values(q, bits).to(dtype) * scale.to(dtype)[:, None]


def pack_int4_halves(q: torch.Tensor) -> torch.Tensor:
    """The CPU kernels' INT4 layout: int values in [-8, 7], [out, in] -> uint8 [out, in/2], column j in the
    low nibble and column j + in/2 in the high one, each stored + 8 (unsigned: unpacking needs no sign)."""
    half = q.shape[1] // 2
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, :half] | (u[:, half:] << 4)).contiguous()
