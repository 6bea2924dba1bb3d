"""A CPU decode step's residual add and the norm after it in one native call (csrc/norm.c): sum = alpha *
residual + branch, rounded to the model's dtype as torch's add rounds it, and the LayerNorm or RMSNorm of
the sum in fp32 (RMSNorm rounded before its gain, as glm.RMSNorm), out in the model's dtype: two to eight
small torch ops (each a parallel region of torch's OpenMP pool) fewer per norm.
"""
from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from glm_tp.kernels import native, probe

DTYPES = (torch.float32, torch.bfloat16)
MAX_ROWS = 16  # decode batches (quant.SMALL_ROWS): larger ones keep torch's ops, which parallelise them


@functools.cache
def _fn() -> ctypes._CFuncPtr:
    fn = native._load()[0].glm_add_norm
    ptr, i64, c_int, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fn.argtypes = [ptr, ptr, f32, ptr, ptr, f32, c_int, c_int, i64, i64, ptr, ptr]
    return fn


class AddNorm:
    """(alpha * residual + branch, norm(that)) for a LayerNorm or an RMSNorm (weight and eps, no bias)."""

    def __init__(self, norm: nn.Module):
        self.rms = not isinstance(norm, nn.LayerNorm)
        self.weight = norm.weight.detach().contiguous()
        bias = getattr(norm, "bias", None)
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.eps, self.n = float(norm.eps), self.weight.shape[0]

    def __call__(self, residual: torch.Tensor, branch: torch.Tensor, alpha: float = 1.0,
                 want_sum: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        if residual.shape != branch.shape or residual.shape[-1] != self.n:
            raise ValueError(f"add_norm: residual {tuple(residual.shape)} and branch {tuple(branch.shape)} "
                             f"are not the same rows of {self.n}")
        if residual.dtype != self.weight.dtype or branch.dtype != residual.dtype:
            raise TypeError(f"add_norm: {residual.dtype} and {branch.dtype} activations for a {self.weight.dtype} norm")
        r, b = residual.contiguous(), branch.contiguous()
        total = torch.empty_like(r) if want_sum else None
        out = torch.empty_like(r)
        if _fn()(r.data_ptr(), b.data_ptr(), alpha, self.weight.data_ptr(),
                 self.bias.data_ptr() if self.bias is not None else None, self.eps, int(self.rms),
                 int(r.dtype == torch.bfloat16), r.numel() // self.n, self.n,
                 total.data_ptr() if total is not None else None, out.data_ptr()):
            raise ValueError(f"glm_add_norm refused its arguments (eps {self.eps})")
        return total, out


def reference(norm: nn.Module, residual: torch.Tensor, branch: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What AddNorm computes, as the model's torch ops."""
    total = torch.add(branch, residual, alpha=alpha)
    return total, norm(total)


def _check(norm: nn.Module) -> bool:
    """On 3 rows against the torch ops of the norm itself (the model's first such norm, its own weights):
    the sum exactly, the norm within one rounding of the dtype."""
    gen = torch.Generator().manual_seed(0)
    dtype = norm.weight.dtype
    residual, branch = (torch.randn(3, 1, norm.weight.shape[0], generator=gen).to(dtype) * 3 for _ in range(2))
    got_sum, got = AddNorm(norm)(residual, branch, 1.7)
    with torch.no_grad():
        want_sum, want = reference(norm, residual, branch, 1.7)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    return torch.equal(got_sum, want_sum) and bool(((got.float() - want.float()).abs() <= tol * want.float().abs().max()).all())


def kernel(norm: nn.Module, kernels: str) -> AddNorm | None:
    """The fused add + norm for a CPU block's norm, or None where torch's ops serve: not CPU, another dtype,
    kernels "torch"/"dequant", the library not built (or only its portable C path: the GEMV's rule), or
    its check failing here."""
    from glm_tp.config import CPU_KERNELS, dtype_name

    weight = norm.weight
    if weight.device.type != "cpu" or weight.dtype not in DTYPES or kernels not in CPU_KERNELS:
        return None
    if not native.available() or native.best_isa() == "scalar":
        return None
    norm_type = "layernorm" if isinstance(norm, nn.LayerNorm) else "rms"
    if not probe.works(f"native-add-{norm_type}", weight.device, dtype_name(weight.dtype), lambda: _check(norm)):
        return None
    return AddNorm(norm)
