"""Weight-only INT8/INT4 matmul on the release's quantized weights (their format: formats.py).

`prepare` turns a quantized weight once (at load) into the fastest form the device has,
checked against plain dequantization on a small case before it is trusted (probe.py):
- "int8pack": torch's fused int8 weight-only matmul (bf16 activations), CPU;
- "int4pack": torch's fused int4 kernel (bf16 activations; its grouped format with unit scales and zero
  point 0), CPU and CUDA sm_80+;
- on CPU, batches of up to SMALL_ROWS rows (decode) go, under kernels="fused", to the compiled integer
  GEMV (`kernels/native.py`: activations quantized per block of 32, Q8_0, as llama.cpp does; the logit
  tolerance this costs is in docs/performance.md) where it is built and passes its check, else to the
  numba GEMV kernels (`kernels/cpu.py`, fp32 activations, weight-only numerics), else to torch's;
  kernels="weight-only" skips the integer GEMV. Larger batches (prefill) go to a bf16 GEMM on the weight's
  integer values (`native.DenseMatmul`, weight-only numerics) where torch's bf16 GEMM has matrix
  instructions (AMX, AVX-512 BF16), else stay on torch's kernels above; kernels="q8" sends them through
  numba's integer kernel with Q8_0 activations instead;
- "float" (`prepare_float`): a bf16 weight on CPU (the LM head, unquantized linears): batches of up to
  SMALL_ROWS rows go to the native bf16 GEMV (AVX-512) or numba's, larger ones to torch's matmul;
- "compiled": CUDA, the dequantization fused into the matmul by torch.compile (Triton) for decode-sized
  batches, cuBLAS on the dequantized weight for prefill;
- "dequant": dequantize to the activation dtype, then F.linear: the reference's computation (always
  available, and chosen with kernels="dequant").
kernels="torch" keeps torch's fused kernels only. The bf16 kernels round activations to bf16, so their
logits differ from the reference's fp16 ones by bf16 rounding; the fp16 row scales are applied exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from glm_tp.config import CPU_KERNELS, check_kernels, dtype_name
from glm_tp.kernels import probe
from glm_tp.kernels.formats import dequantize, int_values, quantize_rows, unpack_int4

# the fused int4 kernels take grouped scales; ours are unit scales (the row scales come after the kernel),
# so the largest group the kernels accept is best: fewer scales to apply (3-10 % faster on CPU than 32)
INT4_GROUPS = (256, 128, 64, 32)

# the CPU GEMV kernels take batches up to this many rows (decode); above, batches are compute-bound and
# stay on torch's kernels, so prefill and large-batch throughput are what they were
SMALL_ROWS = 16

# the bf16 CPU kernel serves weights from this size up: below, its thread wake-up costs more than it saves
# (measured against torch's matmul at batch 1: 0.65x at 0.4 MiB, 1.2x at 2 MiB, 1.5x at 4-8 MiB)
FLOAT_KERNEL_MIN_BYTES = 1 << 20

# a fused kernel for small batches only: larger ones (prefill) are compute-bound, and there cuBLAS on the
# dequantized weight is faster than a GEMV-style kernel
COMPILED_MAX_ROWS = 16


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x @ (q * scale)^T written as one expression, for torch.compile to fuse the dequantization into the
    matmul (for a few rows inductor turns it into a single reduction kernel that reads int8 weights)."""
    return F.linear(x, int_values(q, bits).to(x.dtype)) * scale.to(x.dtype)


_COMPILED: list = []


def _compiled_dequant_linear():
    if not _COMPILED:
        # one specialisation per (rows, weight shape): a TP rank has 4 weight shapes and up to 16 row counts
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        _COMPILED.append(torch.compile(dequant_linear, dynamic=False, fullgraph=True))
    return _COMPILED[0]


@dataclass
class PreparedWeight:
    """A quantized weight in the layout of the kernel that multiplies by it (or, kind "float", a bf16
    weight with its CPU decode kernel)."""

    kind: str
    q: torch.Tensor                # the int8 (or packed INT4) weight; kind "float": the float weight
    scale: torch.Tensor | None     # fp16 row scales; None for kind "float"
    bits: int                      # 8, 4, or 0 for kind "float"
    packed: torch.Tensor | None = None
    scales: torch.Tensor | None = None     # the fused kernel's own scale argument (unit scales)
    row_scale: torch.Tensor | None = None  # the fp16 row scales as fp32, applied after the kernel
    group: int = 0                         # int4 kernels: input columns per (unit) scale
    small: Callable | None = None          # CPU: the kernel for batches of up to SMALL_ROWS rows
    large: Callable | None = None          # CPU, kernels="q8": the kernel for larger batches

    def activated(self, x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor | None:
        """`act(x @ W^T + bias)` (act: an MLP kind, config.mlp; a GLU's rows [first ; second]) fused into the CPU
        GEMV of a decode batch (see fused_activation); None where this weight or batch has no such kernel:
        the native GEMV applies all three, numba's SwiGLU only."""
        if (self.small is None or x.numel() // x.shape[-1] > SMALL_ROWS
                or x.dtype not in (torch.float32, torch.bfloat16)):
            return None
        if hasattr(self.small, "activated"):
            return self.small.activated(x, bias, act)
        return self.small.swiglu(x, bias) if act == "swiglu" and hasattr(self.small, "swiglu") else None

    def swiglu(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`swiglu(x @ W^T + bias)` for a [gate ; up] weight (see activated)."""
        return self.activated(x, bias, "swiglu")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W^T -> [..., out] in x's dtype."""
        rows = x.numel() // x.shape[-1]
        if self.small is not None and rows <= SMALL_ROWS:
            return self.small(x)
        if self.large is not None:
            return self.large(x)
        if self.kind == "float":
            return F.linear(x, self.q)
        if self.kind == "compiled" and rows <= COMPILED_MAX_ROWS:
            return _compiled_dequant_linear()(x, self.q, self.scale, self.bits)
        if self.kind in ("dequant", "compiled"):
            return F.linear(x, dequantize(self.q, self.scale, self.bits, x.dtype))
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.kind == "int8pack":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scales)
        elif x.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales)
        # the kernels ran with unit scales; the fp16 row scales are applied exactly, in fp32
        return (out.float() * self.row_scale).to(x.dtype).reshape(*x.shape[:-1], -1)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """SwiGLU on an h->4h output [..., gate ; up]: silu(gate) * up (the definition the fused kernel follows)."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_activation(kernels: str, act: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an MLP's activation (config.mlp) fuses into the CPU GEMV of its h->4h weight for decode batches
    (the GEMV writes fp32, the activation runs on it and rounds once): CPU, fp32/bf16, kernels in CPU_KERNELS,
    and a kernel passing its check: the native GEMV's epilogues (kernels "fused"/"q8", where built), or
    numba's SwiGLU epilogue (else a warning and the torch ops). The weight's own kernel decides per call
    (PreparedWeight.activated), falling back to the torch ops where it has none."""
    check_kernels(kernels)
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or kernels not in CPU_KERNELS:
        return False
    from glm_tp.kernels import native

    if kernels in ("fused", "q8") and native.available() and probe.works(
            f"native-{act}", device, dtype_name(dtype), lambda: native.check_activation(act, dtype)):
        return True
    return act == "swiglu" and fused_swiglu(kernels, dtype, device)


def fused_swiglu(kernels: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether numba's SwiGLU epilogue serves the weight-only GEMV: CPU, fp32/bf16, kernels in CPU_KERNELS,
    numba, and the epilogue passing its check (else a warning and the torch ops)."""
    check_kernels(kernels)
    if (device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or kernels not in CPU_KERNELS
            or not probe.numba_available()):
        return False
    if not probe.works("swiglu", device, dtype_name(dtype), lambda: _swiglu_works(dtype)):
        warnings.warn("the numba SwiGLU epilogue failed its check here: using torch's silu and multiply")
        return False
    return True


def _swiglu_works(dtype: torch.dtype) -> bool:
    """The fused path against `swiglu` on an INT8 weight with a bias, for 1 and 3 rows (a bf16 rounding)."""
    gen = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(96, 64, generator=gen), 8)
    p = _with_cpu_kernels(PreparedWeight("dequant", q, scale, 8), "weight-only")
    bias = torch.randn(96, generator=gen).to(dtype)
    for rows in (1, 3):
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        want = swiglu(F.linear(x.float(), dequantize(q, scale, 8, torch.float32)) + bias.float())
        got = p.swiglu(x, bias)
        if got is None or got.dtype != dtype or not _close(got, want, 0.02):
            return False
    return True


def _candidates(device: torch.device, bits: int) -> list[str]:
    """The fused kernels for a device, fastest first. torch's int8 weight-only kernel has no CUDA version,
    so CUDA INT8 (and INT4 where torch's int4 kernel needs a newer GPU than sm_80) is compiled with Triton
    by torch.compile, for the GPU at hand: no prebuilt binaries."""
    if device.type == "cpu":
        return ["int8pack" if bits == 8 else "int4pack"]
    if device.type == "cuda":
        return (["int4pack"] if bits == 4 else []) + ["compiled"]
    return []


def _make(kind: str, q: torch.Tensor, scale: torch.Tensor, bits: int) -> PreparedWeight:
    if kind == "compiled":
        return PreparedWeight(kind, q, scale, bits)
    # bf16 cannot hold the fp16 scales exactly (it would shift whole rows by up to 0.4 %): the kernels get
    # unit scales and the real ones are applied to their output
    ones = torch.ones_like(scale, dtype=torch.bfloat16)
    if kind == "int8pack":
        return PreparedWeight(kind, q, scale, bits, scales=ones, row_scale=scale.float())
    k = q.shape[1] * 2
    group = next((g for g in INT4_GROUPS if k % g == 0), None)
    if group is None:
        raise ValueError(f"an INT4 weight's input dim {k} is not a multiple of {INT4_GROUPS[-1]} (the fused "
                         f"kernels' smallest group)")
    unsigned = (unpack_int4(q).to(torch.int32) + 8)  # the kernels store q + 8 and subtract it again
    if q.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack(((unsigned[:, ::2] << 4) | unsigned[:, 1::2]).to(torch.uint8), 8)
    groups = ones.repeat(k // group, 1)
    scales = torch.stack([groups, torch.zeros_like(groups)], dim=-1).contiguous()  # [k/group, n, (scale, zero)]
    return PreparedWeight(kind, q, scale, bits, packed=packed, scales=scales, row_scale=scale.float(), group=group)


def _with_cpu_kernels(p: PreparedWeight, kernels: str, numba: bool = True) -> PreparedWeight:
    """Attach the CPU kernels: the compiled ones (kernels "fused"/"q8": the integer GEMV; "fused" and
    "weight-only": the bf16 GEMM for larger batches) and numba's (imported only here: glm_tp runs without
    it; kernels "numba": the numba GEMV alone, for its own check)."""
    from glm_tp.kernels import native

    native_small = native.small_kernel(p.q, p.scale, p.bits) if kernels in ("fused", "q8") else None
    if numba:
        from glm_tp.kernels import cpu as cpu_kernels

        cpu_kernels.configure_threads()
    p.small = native_small or (cpu_kernels.small_kernel(p.q, p.scale, p.bits) if numba else None)
    if kernels == "q8":
        p.large = cpu_kernels.q8_kernel(p.q, p.scale, p.bits)
    elif kernels in ("fused", "weight-only"):
        p.large = native.dense_kernel(p.q, p.scale, p.bits, native_small)
    if p.large is not None:  # every batch now goes through small or large: torch's layout is not needed
        p.packed = p.scales = None
    return p


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return bool((got.float() - want).abs().max() <= tol * want.abs().max() + 1e-3)


def _kernel_works(device: torch.device, bits: int, kind: str) -> bool:
    """kind: a fused kind, or "numba"/"q8" for the CPU kernels; bits 16: the bf16 kernel."""
    return probe.works(kind, device, {8: "int8", 4: "int4", 16: "bf16"}[bits], lambda: _check(device, bits, kind))


def _check(device: torch.device, bits: int, kind: str) -> bool:
    """Run a kernel once on small random cases (a decode-sized and a prefill-sized batch) and compare with
    dequantization."""
    gen = torch.Generator().manual_seed(0)
    cpu = kind in ("numba", "q8")
    # torch's int4 kernel takes 64-row multiples; 72 rows also test the CPU kernels' partial row block
    w = torch.randn(72 if cpu else 64, 128, generator=gen)
    if bits == 16:
        p, dense = _with_float_kernel(w.bfloat16()), w.bfloat16().float()
    else:
        q, scale = quantize_rows(w, bits)
        dense = dequantize(q, scale, bits, torch.float32).to(device)
        p = _with_cpu_kernels(PreparedWeight("dequant", q, scale, bits), kind) if cpu else \
            _make(kind, q.to(device), scale.to(device), bits)
    ok = True
    for rows, tol in ((3, 0.02), (SMALL_ROWS + 3, 0.05 if kind == "q8" else 0.02)):
        x = torch.randn(rows, 128, generator=gen).to(device, torch.bfloat16 if bits == 16 else None)
        want = F.linear(x.float(), dense)
        ok = ok and _close(p.matmul(x), want, tol)
    return ok


def prepare(q: torch.Tensor, scale: torch.Tensor, bits: int, kernels: str = "fused") -> PreparedWeight:
    """The fastest kernel that works here; kernels: see config.KERNELS (dequant: the reference's computation)."""
    check_kernels(kernels)
    if kernels == "dequant" or not _candidates(q.device, bits):
        return PreparedWeight("dequant", q, scale, bits)
    reason = f"no fused INT{bits} kernel works on {q.device.type}"
    prepared = None
    for kind in _candidates(q.device, bits):
        if _kernel_works(q.device, bits, kind):
            try:
                prepared = _make(kind, q, scale, bits)
                break
            except (ValueError, RuntimeError) as e:  # this weight's shape does not suit the kernel
                reason = str(e)
    if prepared is None:
        # shown once per message (Python's default warning filter), not once per weight
        warnings.warn(f"{reason}: using dequantize + matmul for it (slower)")
        prepared = PreparedWeight("dequant", q, scale, bits)
    if q.device.type == "cpu" and kernels in CPU_KERNELS:
        prepared = _attach_cpu(prepared, kernels)
    return prepared


def prepare_float(w: torch.Tensor, kernels: str = "fused") -> PreparedWeight | None:
    """A bf16 weight's CPU decode kernel (the native bf16 GEMV where built, on AVX-512 CPUs; else numba's),
    or None where torch's matmul serves every batch: other devices and dtypes, kernels "torch"/"dequant",
    neither kernel here, an odd input dim, a weight under FLOAT_KERNEL_MIN_BYTES, or a kernel failing its
    check. Both compute in fp32 from the exact bf16 values and round once."""
    check_kernels(kernels)
    if (w.device.type != "cpu" or w.dtype != torch.bfloat16 or kernels not in CPU_KERNELS or w.shape[1] % 2
            or w.numel() * w.element_size() < FLOAT_KERNEL_MIN_BYTES):
        return None
    from glm_tp.kernels import native

    fast = native.bf16_kernel(w)
    if fast is not None:
        return PreparedWeight("float", w, None, 0, small=fast)
    if not probe.numba_available():
        return None
    if not _kernel_works(w.device, 16, "numba"):
        warnings.warn("the numba bf16 CPU kernel failed its check here: using torch's matmul")
        return None
    return _with_float_kernel(w)


def _with_float_kernel(w: torch.Tensor) -> PreparedWeight:
    from glm_tp.kernels import cpu as cpu_kernels

    cpu_kernels.configure_threads()
    return PreparedWeight("float", w, None, 0, small=cpu_kernels.bf16_weight_kernel(w))


def _attach_cpu(prepared: PreparedWeight, kernels: str) -> PreparedWeight:
    numba = probe.numba_available()
    if kernels == "q8" and not numba:
        raise ValueError("kernels=q8 needs numba: pip install numba (or the [cpu] extra)")
    if numba and not _kernel_works(prepared.q.device, prepared.bits, "numba"):
        warnings.warn(f"the numba INT{prepared.bits} CPU kernels failed their check here: using torch's")
        numba = False
    if kernels == "q8" and not _kernel_works(prepared.q.device, prepared.bits, "q8"):
        raise ValueError(f"the q8 INT{prepared.bits} kernel failed its check here: use kernels=fused")
    return _with_cpu_kernels(prepared, kernels, numba)
