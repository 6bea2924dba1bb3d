"""Weight-only INT8/INT4 and bf16 matmul kernels for CPU decode, compiled by numba (the optional `cpu` extra).

At batch 1 a decode step is a stream of GEMVs whose cost is reading the weights; torch's CPU weight-only
kernels read well below the memory bandwidth on AVX2 machines. These kernels are plain loops that LLVM
vectorizes (weights -> float32, fused multiply-add), parallel over blocks of output rows, with the fp16 row
scales applied exactly afterwards in fp32:
- `int8_kernel`: weights int8 [out, in] (the checkpoint's own tensor); batch rows four at a time, so each
  weight is converted once per four rows;
- `int4_kernel`: weights as `pack_int4_halves` lays them out: byte j of a row holds input column j in the
  low nibble and column j + in/2 in the high nibble, both stored as q + 8 (unsigned), so unpacking needs no
  sign handling and the two halves of x are read contiguously;
- `bf16_kernel`: bf16 weights (the LM head, unquantized linears) read as pairs in uint32 words; a bf16 is
  the top half of a float32, so widening is a mask or a shift;
- `q8_kernel_`: the option for larger batches: activations quantized to int8 per block of `Q8_BLOCK` input
  columns (one fp32 scale per block, as llama.cpp's Q8_0), integer dot products per block;
- `swiglu_kernel`: SwiGLU's silu(gate) * up on a GEMV's fp32 output (`Matmul.swiglu`), one pass, one rounding.
A decode step's attention is in `cpu_attention.py`.
The GEMV kernels take activations as float32 or as bf16 bits (uint16) and write their output in the same
form (bf16 rounded to nearest even, as torch rounds), so a bf16 model needs no conversions around them.
`small_kernel` / `bf16_weight_kernel` / `q8_kernel` wrap them as callables on torch tensors (`Matmul`).

Compiled code is cached on disk (`cache=True`): the first load in a fresh environment compiles (tens of
seconds on a busy 2-core machine), later ones load it.
numba runs its own thread pool; `configure_threads` gives it torch's thread count so the two pools never
run more threads than cores between them (they take turns: a decode step alternates torch ops and kernels).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from glm_tp.kernels.formats import pack_int4_halves, unpack_int4

ROW_BLOCK = 16  # output rows per parallel task: small enough to balance 2-16 threads on 2k-row weights
Q8_BLOCK = 32   # input columns per activation scale in the q8 option (llama.cpp's Q8_0 block)


_jit = njit(parallel=True, fastmath=True, cache=True, nogil=True)


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_f32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen


def _as_f32(value):
    """One element as float32: itself, or widened from bf16 bits."""


@overload(_as_f32, inline="always")
def _as_f32_impl(value):
    if value == types.float32:
        return lambda value: value
    return lambda value: _f32_from_bits(np.uint32(value) << np.uint32(16))


def _float32_rows(x):
    """x as float32 [m, k]: itself, or widened from bf16 bits."""


@overload(_float32_rows)
def _float32_rows_impl(x):
    if x.dtype == types.float32:
        return lambda x: x

    def widen(x):
        out = np.empty(x.shape, np.float32)
        for m in range(x.shape[0]):
            for k in range(x.shape[1]):
                out[m, k] = _as_f32(x[m, k])
        return out
    return widen


def _put(out, m, n, value):
    """out[m, n] = value, rounded to bf16 (nearest even, NaN kept) when out holds bf16 bits."""


@overload(_put, inline="always")
def _put_impl(out, m, n, value):
    if out.dtype == types.float32:
        def store(out, m, n, value):
            out[m, n] = value
        return store

    def store_bf16(out, m, n, value):
        u = _bits_of_f32(np.float32(value))
        if value != value:
            out[m, n] = np.uint16(0x7FC0)
        else:
            out[m, n] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return store_bf16


@_jit
def int8_kernel(x_in, w, s, out):
    x = _float32_rows(x_in)
    m_rows, k_cols = x.shape
    n_rows = w.shape[0]
    for blk in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
        for n in range(blk * ROW_BLOCK, min(n_rows, blk * ROW_BLOCK + ROW_BLOCK)):
            wr = w[n]
            m = 0
            while m + 4 <= m_rows:
                x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
                a0 = a1 = a2 = a3 = np.float32(0)
                for k in range(k_cols):
                    f = np.float32(wr[k])
                    a0 += x0[k] * f
                    a1 += x1[k] * f
                    a2 += x2[k] * f
                    a3 += x3[k] * f
                _put(out, m, n, a0 * s[n])
                _put(out, m + 1, n, a1 * s[n])
                _put(out, m + 2, n, a2 * s[n])
                _put(out, m + 3, n, a3 * s[n])
                m += 4
            for r in range(m, m_rows):
                xr = x[r]
                acc = np.float32(0)
                for k in range(k_cols):
                    acc += xr[k] * np.float32(wr[k])
                _put(out, r, n, acc * s[n])


@_jit
def int4_kernel(x_in, w, s, out):
    # byte v = 16 * hi + lo (unsigned nibbles): x_lo*lo + x_hi*hi = x_lo*v + (x_hi - 16 x_lo)*hi, so
    # only hi = floor(v / 16) is unpacked; the +8 offset comes off as 8 * sum(x)
    x = _float32_rows(x_in)
    m_rows, k_cols = x.shape
    n_rows, half = w.shape
    xl = np.empty((m_rows, half), np.float32)
    xd = np.empty((m_rows, half), np.float32)
    offset = np.empty(m_rows, np.float32)
    for m in range(m_rows):
        t = np.float32(0)
        for k in range(half):
            xl[m, k] = x[m, k]
            xd[m, k] = x[m, k + half] - np.float32(16) * x[m, k]
            t += x[m, k] + x[m, k + half]
        offset[m] = np.float32(8) * t
    for blk in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
        for n in range(blk * ROW_BLOCK, min(n_rows, blk * ROW_BLOCK + ROW_BLOCK)):
            wr = w[n]
            for m in range(m_rows):
                a, d = xl[m], xd[m]
                acc = np.float32(0)
                for k in range(half):
                    f = np.float32(wr[k])
                    acc += a[k] * f + d[k] * np.floor(f * np.float32(0.0625))
                _put(out, m, n, (acc - offset[m]) * s[n])


@_jit
def bf16_kernel(x_in, w, out):
    # w: bf16 [out, in] as uint32 [out, in/2]; a word holds column 2j in its low half and 2j + 1 in its high
    # half (little-endian), so x is split into its even and odd columns once
    x = _float32_rows(x_in)
    m_rows = x.shape[0]
    n_rows, half = w.shape
    xe = np.empty((m_rows, half), np.float32)
    xo = np.empty((m_rows, half), np.float32)
    for m in range(m_rows):
        for k in range(half):
            xe[m, k], xo[m, k] = x[m, 2 * k], x[m, 2 * k + 1]
    for blk in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
        for n in range(blk * ROW_BLOCK, min(n_rows, blk * ROW_BLOCK + ROW_BLOCK)):
            wr = w[n]
            for m in range(m_rows):
                e, o = xe[m], xo[m]
                acc = np.float32(0)
                for k in range(half):
                    u = wr[k]
                    acc += (e[k] * _f32_from_bits(u << np.uint32(16))
                            + o[k] * _f32_from_bits(u & np.uint32(0xFFFF0000)))
                _put(out, m, n, acc)


@njit(fastmath=True, inline="always")
def _int_dot(a, b):
    # int8 x int8 summed in int32 (the truncation lets LLVM use 16-bit multiply-adds, vpmaddwd)
    acc = np.int32(0)
    for k in range(a.shape[0]):
        acc = np.int32(acc + np.int16(a[k]) * np.int16(b[k]))
    return acc


@_jit
def q8_kernel_(xq, dx, w, s, out):
    m_rows, k_cols = xq.shape
    n_rows = w.shape[0]
    for blk in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
        for n in range(blk * ROW_BLOCK, min(n_rows, blk * ROW_BLOCK + ROW_BLOCK)):
            wr = w[n]
            for m in range(m_rows):
                xr, dr = xq[m], dx[m]
                acc = np.float32(0)
                for b in range(k_cols // Q8_BLOCK):
                    o = b * Q8_BLOCK
                    acc += np.float32(_int_dot(wr[o:o + Q8_BLOCK], xr[o:o + Q8_BLOCK])) * dr[b]
                out[m, n] = acc * s[n]


@njit(fastmath=True, inline="always")
def _exp(x):
    # e^x as 2^n * e^r, |r| <= ln2/2, in plain arithmetic that LLVM vectorizes (numba's np.exp is a scalar
    # call without Intel's SVML: 4x slower than torch's silu on a 13696-wide row); a few ulp in fp32
    x = min(max(x, np.float32(-87)), np.float32(88))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = (p * r * r + r) + np.float32(1)
    return p * _f32_from_bits(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))


@njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def swiglu_kernel(y, bias, out):
    # y: fp32 [m, 2f], the h->4h GEMV's unrounded output (gate columns, then up); bias: [2f] or empty;
    # out [m, f] = silu(gate) * up, computed in fp32 and rounded once. Serial: a 13696-wide row takes ~9 us,
    # less than waking the thread pool; numpy's error model lets the division vectorize (no zero check)
    m_rows, f = out.shape
    for m in range(m_rows):
        if bias.shape[0] == 0:
            for j in range(f):
                gate = y[m, j]
                _put(out, m, j, gate / (np.float32(1) + _exp(-gate)) * y[m, j + f])
        else:
            for j in range(f):
                gate, up = y[m, j] + _as_f32(bias[j]), y[m, j + f] + _as_f32(bias[j + f])
                _put(out, m, j, gate / (np.float32(1) + _exp(-gate)) * up)


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [m, k] -> int8 [m, k] and fp32 scales [m, k/Q8_BLOCK]: absmax/127 per block (Q8_0)."""
    blocks = x.reshape(x.shape[0], -1, Q8_BLOCK)
    d = blocks.abs().amax(-1) / 127
    q = torch.round(blocks / torch.where(d == 0, 1, d)[..., None]).to(torch.int8)
    return q.reshape(x.shape), d


def configure_threads() -> None:
    """numba's pool gets torch's thread count (torch's is what the user or the launcher set)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's memory as a numpy array; bf16 as its bits (uint16), which numpy has no type for."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


_NO_BIAS = np.empty(0, np.float32)


class Matmul:
    """x [..., in] @ (W * scale[:, None])^T through one of the kernels, W held in that kernel's layout
    (scale None: a float weight). float32 and bf16 activations go in and come out as they are."""

    def __init__(self, kernel, w: torch.Tensor, scale: torch.Tensor | None, q8: bool = False):
        self.kernel, self.w, self.q8 = kernel, w.contiguous(), q8
        self.scale = None if scale is None else scale.float().contiguous()
        # views: the tensors keep the memory alive; a bf16 weight goes as pairs of columns per uint32
        weight = _numpy(self.w).view(np.uint32) if self.w.dtype == torch.bfloat16 else self.w.numpy()
        self.arrays = (weight,) + (() if self.scale is None else (self.scale.numpy(),))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n_out = self.w.shape[0]
        if self.q8 or x.dtype not in (torch.float32, torch.bfloat16):
            flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
            out = torch.empty(flat.shape[0], n_out)
            inputs = [t.numpy() for t in quantize_q8(flat)] if self.q8 else [flat.numpy()]
            self.kernel(*inputs, *self.arrays, out.numpy())
            return out.to(x.dtype).view(*x.shape[:-1], n_out)
        # the decode path: a few microseconds of Python per call are a measurable part of a small step
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty(flat.shape[0], n_out, dtype=x.dtype)
        self.kernel(_numpy(flat), *self.arrays, _numpy(out))
        return out.view(*x.shape[:-1], n_out)

    def swiglu(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """silu(gate) * up of this weight's output [gate rows ; up rows] (+ bias): the GEMV writes fp32, the
        epilogue activates it in one pass and rounds once to x's dtype (float32 or bf16, not the q8 path)."""
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.empty(flat.shape[0], self.w.shape[0])
        self.kernel(_numpy(flat), *self.arrays, y.numpy())
        out = torch.empty(flat.shape[0], self.w.shape[0] // 2, dtype=x.dtype)
        swiglu_kernel(y.numpy(), _NO_BIAS if bias is None else _numpy(bias), _numpy(out))
        return out.view(*x.shape[:-1], -1)


def small_kernel(q: torch.Tensor, scale: torch.Tensor, bits: int) -> Matmul:
    """The GEMV kernel for a quantized weight in the checkpoint's layout (int8 [out, in] or packed INT4)."""
    if bits == 8:
        return Matmul(int8_kernel, q, scale)  # the checkpoint's own tensor: no copy
    return Matmul(int4_kernel, pack_int4_halves(unpack_int4(q)), scale)


def bf16_weight_kernel(w: torch.Tensor) -> Matmul | None:
    """The GEMV kernel for a bf16 [out, in] weight (its own memory, no copy); None for an odd input dim."""
    if w.shape[1] % 2:
        return None
    return Matmul(bf16_kernel, w, None)


def q8_kernel(q: torch.Tensor, scale: torch.Tensor, bits: int) -> Matmul | None:
    """The integer kernel with Q8_0 activations; None when the input dim is not a multiple of Q8_BLOCK.
    INT4 weights are widened to int8 for it (twice their memory)."""
    w = q if bits == 8 else unpack_int4(q)
    return Matmul(q8_kernel_, w, scale, q8=True) if w.shape[1] % Q8_BLOCK == 0 else None
