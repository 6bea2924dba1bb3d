"""The compiled CPU GEMV kernels (glm_tp/kernels/csrc, built at install as an optional extension, loaded
with ctypes): INT8 and INT4 weights against activations quantized per block of 32 input columns (Q8_0),
with integer dot products (AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw` + `vpmaddwd`, or portable C).

`q8_reference` is the computation in torch; the compiled paths equal it up to fp32 summation order. The
path is the best the CPU has, or GLM_TP_NATIVE_ISA (vnni, avx2, scalar; off: do not use the library), or
an `isa` argument. `describe()` is the one line that says which path runs. Where the library was not built
(no compiler at install, another OS), `available()` is False and callers keep their other kernels.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import torch
import torch.nn.functional as F

from glm_tp.kernels import probe
from glm_tp.kernels.formats import dequantize, int_values, pack_int4_halves, quantize_rows, unpack_int4

Q8_BLOCK = 32
ISAS = {"scalar": 1, "avx2": 2, "vnni": 3}  # the C library's ids (gemv.h)
ISA_NAMES = {"vnni": "AVX-512 VNNI", "avx2": "AVX2", "scalar": "portable C"}
ENV = "GLM_TP_NATIVE_ISA"
# the activations the GEMV applies to its output (gemv.h's ACT_*), as the MLPs name them (config.mlp):
# "gelu" tanh-GeLU of ChatGLM-6B; "swiglu" silu(gate) * up; "geglu" value * gelu(gate), exact GeLU
ACTIVATIONS = {"gelu": 1, "swiglu": 2, "geglu": 3}

# DenseMatmul unpacks this many bf16 bytes of weight per GEMM call: chunks of 1-4 MiB made each GEMM call
# pay torch's per-call cost (measured 23-86 ms vs 7.4 ms for one 11008x2048 call at 128 rows), so one
# call per weight up to this bound on the temporary
CHUNK_BYTES = 1 << 25

# a thread gets at least this many weight bytes: below, waking it costs more than it saves
MIN_BYTES_PER_THREAD = 1 << 18

_lib: list = []  # [ctypes.CDLL or None, reason it is None]


def _load() -> tuple[ctypes.CDLL | None, str]:
    if not _lib:
        _lib.extend(_open())
    return _lib[0], _lib[1]


def _open() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(ENV, "").lower() == "off":
        return None, f"turned off by {ENV}=off"
    spec = importlib.util.find_spec("glm_tp.kernels._gemv")
    if spec is None or not spec.origin:
        return None, "not built (glm_tp/kernels/_gemv: reinstall with a C compiler present)"
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        return None, f"not loadable: {e}"
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.glm_gemv.argtypes = [c_int, c_int, ptr, ptr, i64, i64, ptr, c_int, i64, ptr, c_int, c_int, ptr, c_int]
    lib.glm_quantize_q8.argtypes = [c_int, ptr, c_int, i64, i64, ptr, ptr]
    lib.glm_isa_supported.argtypes = [c_int]
    lib.glm_unpack_bf16.argtypes = [c_int, ptr, i64, i64, i64, ptr, c_int]
    lib.glm_gemv_bf16.argtypes = [ptr, i64, i64, ptr, c_int, i64, ptr, c_int]
    return lib, ""


def available() -> bool:
    return _load()[0] is not None


def supported(isa: str) -> bool:
    """Whether this CPU runs a path (False for every path where the library is not built)."""
    lib = _load()[0]
    return lib is not None and bool(lib.glm_isa_supported(ISAS[isa]))


def best_isa() -> str | None:
    """The path calls take: GLM_TP_NATIVE_ISA if set (and runnable here), else the best one; None: none."""
    lib = _load()[0]
    if lib is None:
        return None
    wanted = os.environ.get(ENV, "").lower()
    if wanted:
        if wanted not in ISAS:
            raise ValueError(f"{ENV}={wanted!r}: use one of {', '.join(ISAS)} or off")
        if not supported(wanted):
            raise ValueError(f"{ENV}={wanted}: this CPU does not run the {ISA_NAMES[wanted]} path")
        return wanted
    return next(name for name, i in ISAS.items() if i == lib.glm_best_isa())


def describe() -> str:
    """One line: which native path runs here, or why none does."""
    lib, reason = _load()
    if lib is None:
        return f"native CPU kernels: {reason}"
    isa = best_isa()
    return f"native CPU kernels: {ISA_NAMES[isa]} path ({isa}), integer dot products on Q8_0 activations"


def _isa_id(isa: str | None) -> int:
    name = isa or best_isa()
    if name is None:
        raise RuntimeError(describe())
    if not supported(name):
        raise ValueError(f"this CPU does not run the {ISA_NAMES[name]} path")
    return ISAS[name]


def _activations(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"native kernels take float32 or bf16 CPU activations, not {x.dtype} on {x.device}")
    if x.shape[-1] % Q8_BLOCK:
        raise ValueError(f"input dim {x.shape[-1]} is not a multiple of the Q8 block ({Q8_BLOCK})")
    return x.reshape(-1, x.shape[-1]).contiguous()


def quantize_q8(x: torch.Tensor, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's activation quantizer: [..., k] -> int8 [m, k] and fp32 block scales [m, k/32]."""
    flat = _activations(x)
    m, k = flat.shape
    xq, dx = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // 4)
    lib = _load()[0]
    if lib.glm_quantize_q8(_isa_id(isa), flat.data_ptr(), int(flat.dtype == torch.bfloat16), m, k,
                           xq.data_ptr(), dx.data_ptr()):
        raise RuntimeError("glm_quantize_q8 refused its arguments")
    return xq, dx[:, ::8].contiguous()


def q8_quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 in torch: x [m, k] -> int8 [m, k/32, 32] and fp32 scales [m, k/32] (absmax/127, round half to even)."""
    blocks = x.float().reshape(x.shape[0], -1, Q8_BLOCK)
    d = blocks.abs().amax(-1) / 127
    return torch.round(blocks / torch.where(d == 0, 1, d)[..., None]).to(torch.int8), d


def q8_block_terms(x: torch.Tensor, q: torch.Tensor, bits: int) -> torch.Tensor:
    """[m, n, k/32] float64: each block's exact int dot product times its activation scale."""
    xq, d = q8_quantize_reference(x)
    w = int_values(q, bits).double().reshape(q.shape[0], -1, Q8_BLOCK)
    dots = torch.einsum("mbj,nbj->mnb", xq.double(), w)  # exact: integers below 2^53
    return dots * d.double()[:, None, :]


def q8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernels' computation in torch, summed in float64: x [m, k] @ W^T with Q8_0 activations."""
    return q8_block_terms(x, q, bits).sum(-1) * scale.double()


class NativeMatmul:
    """x [..., in] @ (W * scale[:, None])^T by the compiled kernel; W int8 [out, in] (used as it is) or
    packed INT4 (re-laid out once as `pack_int4_halves`). float32 and bf16 activations come out as they go in."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bits: int, isa: str | None = None):
        if q.device.type != "cpu" or q.dtype != torch.int8 or q.dim() != 2:
            raise TypeError(f"expected an int8 [out, in] CPU weight, not {q.dtype} {tuple(q.shape)} on {q.device}")
        k = q.shape[1] * (2 if bits == 4 else 1)
        if k % (Q8_BLOCK * (2 if bits == 4 else 1)):
            raise ValueError(f"INT{bits} input dim {k}: the native kernel needs a multiple of "
                             f"{Q8_BLOCK * (2 if bits == 4 else 1)}")
        self.bits, self.isa, self.n, self.k = bits, _isa_id(isa), q.shape[0], k
        self.w = q.contiguous() if bits == 8 else pack_int4_halves(unpack_int4(q))
        self.scale = scale.float().contiguous()
        self.max_threads = max(1, self.w.numel() // MIN_BYTES_PER_THREAD)
        self._gemv, self._w, self._scale = _load()[0].glm_gemv, self.w.data_ptr(), self.scale.data_ptr()

    def __call__(self, x: torch.Tensor, threads: int | None = None, bias: torch.Tensor | None = None,
                 act: str | None = None) -> torch.Tensor:
        """x @ W^T, or act(x @ W^T + bias) in fp32 with one rounding (act: an ACTIVATIONS name; a GLU's
        output has half the columns)."""
        # the decode path: a few microseconds of Python per call are a measurable part of a small GEMV
        if x.dtype not in (torch.float32, torch.bfloat16):  # e.g. fp16: the kernel's own dtypes around it
            return self(x.float(), threads, bias, act).to(x.dtype)
        if x.device.type != "cpu":
            raise TypeError(f"native kernels take CPU activations, not {x.device}")
        if x.shape[-1] != self.k:
            raise ValueError(f"activations have {x.shape[-1]} columns, the weight {self.k}")
        flat = x if x.dim() == 2 else x.reshape(-1, self.k)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        act_id = ACTIVATIONS[act] if act is not None else 0
        n_out = self.n // 2 if act in ("swiglu", "geglu") else self.n
        out = torch.empty(flat.shape[0], n_out, dtype=flat.dtype)
        b = 0
        if bias is not None:
            bias = bias.float().contiguous()  # kept alive until the call returns
            b = bias.data_ptr()
        bf16 = int(flat.dtype == torch.bfloat16)
        t = threads if threads is not None else min(torch.get_num_threads(), self.max_threads)
        if self._gemv(self.isa, self.bits, self._w, self._scale, self.n, self.k, flat.data_ptr(), bf16,
                      flat.shape[0], out.data_ptr(), bf16, t, b, act_id):
            raise RuntimeError("glm_gemv refused its arguments")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], n_out)

    def activated(self, x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
        """act(x @ W^T + bias) (see __call__)."""
        return self(x, None, bias, act)

    def swiglu(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self(x, None, bias, "swiglu")


def _check(bits: int) -> bool:
    """The path at hand on a small case (a partial 16-row part, a 32-column tail, 3 and 19 batch rows)
    against dequantization, within Q8 activation rounding."""
    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(72, 192, generator=gen), bits)
    mm, dense = NativeMatmul(q, scale, bits), dequantize(q, scale, bits, torch.float32)
    for rows in (3, 19):
        x = torch.randn(rows, 192, generator=gen)
        want = x @ dense.t()
        if not (mm(x) - want).abs().max() <= 0.05 * want.abs().max() + 1e-3:
            return False
    return True


def activation_reference(y: torch.Tensor, act: str) -> torch.Tensor:
    """The epilogues' definitions in torch, on the GEMV's output with its bias (GLUs: rows [first ; second])."""
    if act == "gelu":
        return F.gelu(y, approximate="tanh")
    first, second = y.chunk(2, dim=-1)
    return F.silu(first) * second if act == "swiglu" else first * F.gelu(second)


def check_activation(act: str, dtype: torch.dtype) -> bool:
    """An epilogue on a small case (a bias, 1 and 3 rows) against its torch definition on the kernel's own
    fp32 GEMV output: one rounding to `dtype`."""
    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(96, 64, generator=gen), 8)
    mm, bias = NativeMatmul(q, scale, 8), torch.randn(96, generator=gen)
    for rows in (1, 3):
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        want = activation_reference(mm(x.float()).double() + bias.double(), act)
        got = mm(x, None, bias, act)
        tol = 2e-5 if dtype == torch.float32 else 2 ** -8
        if got.dtype != dtype or not ((got.double() - want).abs() <= tol * want.abs().max() + 1e-5).all():
            return False
    return True


def small_kernel(q: torch.Tensor, scale: torch.Tensor, bits: int) -> NativeMatmul | None:
    """The native GEMV for a CPU weight, or None where it cannot serve it: the library not built, only the
    portable C path here (slower than numba's kernels: 2.2 vs 5.1 GB/s measured, so it runs only when
    GLM_TP_NATIVE_ISA asks for it), a shape it refuses, or the path failing its check against
    dequantization here (checked once per process)."""
    isa = best_isa() if available() else None
    if isa is None or (isa == "scalar" and not os.environ.get(ENV)):
        return None
    if q.device.type != "cpu" or q.shape[1] * (2 if bits == 4 else 1) % (64 if bits == 4 else 32):
        return None
    if not probe.works(f"native-{isa}", q.device, f"int{bits}", lambda: _check(bits)):
        return None
    return NativeMatmul(q, scale, bits, isa)


def bf16_matmul_fast() -> bool:
    """Whether torch's bf16 GEMM has matrix instructions here (AMX or AVX-512 BF16, through oneDNN): then a
    prefill-sized batch is fastest as a bf16 GEMM on the weight's integer values (DenseMatmul)."""
    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


_SCRATCH: list[torch.Tensor] = []  # DenseMatmul's chunk, shared by every weight (calls come one at a time)


def _scratch(elements: int) -> torch.Tensor:
    """A bf16 buffer of at least `elements`, kept: a fresh 32 MiB one per call cost its page faults (a 16-row
    call measured 73 ms against 16 ms for the unpack and GEMM on a kept buffer)."""
    if not _SCRATCH or _SCRATCH[0].numel() < elements:
        _SCRATCH[:] = [torch.empty(elements, dtype=torch.bfloat16)]
    return _SCRATCH[0][:elements]


class DenseMatmul:
    """x [..., in] @ (W * scale[:, None])^T for larger batches: the weight's integer values, unpacked to bf16 by
    the library `chunk` rows at a time (exact: |q| <= 127), each chunk multiplied by torch's bf16 GEMM while
    it is in cache, the fp32 row scales applied to the output. The numerics of torch's weight-only kernels
    (bf16 activations, the unscaled product rounded to bf16, the scales applied after); no extra memory
    but one chunk."""

    def __init__(self, w: NativeMatmul, chunk_bytes: int = CHUNK_BYTES):
        self.w, self.n, self.k, self.bits = w, w.n, w.k, w.bits
        self.rows = max(16, min(self.n, chunk_bytes // (2 * self.k)) // 16 * 16)
        self._unpack = _load()[0].glm_unpack_bf16

    def weight(self, r0: int, r1: int, out: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """Rows [r0, r1) of the weight's integer values as bf16, written into `out` [>= r1 - r0, in]."""
        t = threads if threads is not None else torch.get_num_threads()
        if self._unpack(self.bits, self.w._w, r0, r1, self.k, out.data_ptr(), t):
            raise RuntimeError("glm_unpack_bf16 refused its arguments")
        return out[:r1 - r0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"activations have {x.shape[-1]} columns, the weight {self.k}")
        flat = x.reshape(-1, self.k).to(torch.bfloat16)
        buf = _scratch(self.rows * self.k).view(self.rows, self.k)
        parts = [torch.mm(flat, self.weight(r0, min(r0 + self.rows, self.n), buf).t())
                 for r0 in range(0, self.n, self.rows)]
        out = torch.cat(parts, dim=1).float() * self.w.scale
        return out.to(x.dtype).reshape(*x.shape[:-1], self.n)


def _check_dense(bits: int) -> bool:
    """DenseMatmul on a small case against dequantization: a bf16 rounding of the product."""
    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(72, 192, generator=gen), bits)
    dense = dequantize(q, scale, bits, torch.float32)
    mm = DenseMatmul(NativeMatmul(q, scale, bits), chunk_bytes=32 * 192 * 2)  # 3 chunks, the last partial
    x = torch.randn(40, 192, generator=gen)
    want = x.bfloat16().float() @ dense.t()
    return bool((mm(x) - want).abs().max() <= 0.01 * want.abs().max() + 1e-3)


def dense_kernel(q: torch.Tensor, scale: torch.Tensor, bits: int, small: NativeMatmul | None = None
                 ) -> DenseMatmul | None:
    """The bf16-GEMM matmul for a CPU weight's larger batches, or None where torch's kernels serve them
    better or it cannot: the library not built, no bf16 matrix instructions here (bf16_matmul_fast), a shape
    NativeMatmul refuses, or the check against dequantization failing. `small`: the weight's NativeMatmul,
    if it has one (its INT4 layout is shared)."""
    if not available() or not bf16_matmul_fast() or q.device.type != "cpu":
        return None
    if q.shape[1] * (2 if bits == 4 else 1) % (64 if bits == 4 else 32):
        return None
    if not probe.works("native-dense", q.device, f"int{bits}", lambda: _check_dense(bits)):
        return None
    return DenseMatmul(small if small is not None else NativeMatmul(q, scale, bits, "scalar"))


class NativeBF16Matmul:
    """x [..., in] @ W^T for a bf16 weight [out, in] (the LM head, unquantized linears), AVX-512: the weight
    widened exactly to fp32, fp32 FMA, one rounding to x's dtype (fp32 or bf16), as numba's bf16 GEMV
    computes it, in the same pool as the quantized GEMVs."""

    def __init__(self, w: torch.Tensor):
        if w.dtype != torch.bfloat16 or w.dim() != 2 or w.shape[1] % 32:
            raise ValueError(f"expected a bf16 [out, in] weight with in a multiple of 32, not {w.dtype} {tuple(w.shape)}")
        self.w, self.n, self.k = w.contiguous(), w.shape[0], w.shape[1]
        self.max_threads = max(1, self.w.numel() * 2 // MIN_BYTES_PER_THREAD)
        self._gemv = _load()[0].glm_gemv_bf16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            return self(x.float()).to(x.dtype)
        if x.shape[-1] != self.k:
            raise ValueError(f"activations have {x.shape[-1]} columns, the weight {self.k}")
        flat = x.reshape(-1, self.k).contiguous()
        out = torch.empty(flat.shape[0], self.n, dtype=flat.dtype)
        t = min(torch.get_num_threads(), self.max_threads)
        if self._gemv(self.w.data_ptr(), self.n, self.k, flat.data_ptr(), int(flat.dtype == torch.bfloat16),
                      flat.shape[0], out.data_ptr(), t):
            raise RuntimeError("glm_gemv_bf16 refused its arguments")
        return out.view(*x.shape[:-1], self.n)


def _check_bf16() -> bool:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(72, 96, generator=gen).bfloat16()
    mm = NativeBF16Matmul(w)
    for rows in (1, 5):
        x = torch.randn(rows, 96, generator=gen)
        want = x.double() @ w.double().t()
        if not (mm(x).double() - want).abs().max() <= 1e-5 * want.abs().max():
            return False
    return True


def bf16_kernel(w: torch.Tensor) -> NativeBF16Matmul | None:
    """The native bf16 GEMV for a CPU weight, or None: the library not built, no AVX-512 or another path
    asked for by GLM_TP_NATIVE_ISA (numba's serves those), an input dim that is not a multiple of 32, or
    the check failing."""
    if not available() or best_isa() != "vnni" or w.device.type != "cpu" or w.shape[1] % 32:
        return None
    if not probe.works("native-bf16", w.device, "bf16", _check_bf16):
        return None
    return NativeBF16Matmul(w)
