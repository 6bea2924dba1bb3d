"""How a layer's attention is computed on each device. The math is one: softmax(q k^T / sqrt(d)) v with the
softmax in fp32, under GLM's mask (True = hidden); three ways to compute it:
- `reference_attention`: the reference's recipe in the model's dtype (CUDA, where decode steps are captured
  as CUDA graphs);
- torch's fused attention on CPU (`attend`): fp32 inside, the cache read as it is;
- on CPU, one query per row (a decode step) through the numba kernel `cpu_kernels.decode_attention`, which
  reads each cached key and value once (torch's fused attention reads a 1k-slot window of one row at under
  2 GB/s). `decode_kernel` chooses it at load, after checking it against the fused attention on a small case.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from . import quant

MASK_FILL = -10000.0

DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, layer_id: int) -> torch.Tensor:
    """q [b, heads, s, d], keys/values [b, heads, window, d], mask [b, 1, s, window] -> [b, heads, s, d]."""
    if q.device.type == "cpu":
        # converting a long window to fp32 for two batched matmuls cost 2.3x per step at 1k tokens
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=~mask, scale=1 / math.sqrt(q.shape[-1]))
    return reference_attention(q, keys, values, mask, layer_id)


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                        layer_id: int) -> torch.Tensor:
    """The reference's attention in the model's dtype: q scaled down by c = layer + 1 so that half-precision
    scores cannot overflow, masked scores set to MASK_FILL, softmax(scores * c) in fp32. The CPU paths give
    masked keys the same weight, exactly 0; a query that sees no key at all (a left-pad slot, never read)
    gets 0 there instead of the mean of the values."""
    c = float(layer_id + 1)
    scores = torch.matmul(q / (math.sqrt(q.shape[-1]) * c), keys.transpose(-1, -2))
    scores = scores.masked_fill(mask, MASK_FILL)
    probs = torch.softmax(scores.float() * c, dim=-1).to(q.dtype)
    return torch.matmul(probs, values)


_DECODE_OK: dict[torch.dtype, bool] = {}


def decode_kernel(kernels: str, dtype: torch.dtype, device: torch.device) -> DecodeKernel | None:
    """The CPU decode-attention kernel, or None where `attend` serves every call: other devices and dtypes,
    kernels "torch"/"dequant", no numba, or a kernel failing its check (with a warning)."""
    quant.check_kernels(kernels)
    if (device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or kernels not in ("fused", "q8")
            or importlib.util.find_spec("numba") is None):
        return None
    from . import cpu_kernels

    if dtype not in _DECODE_OK:
        _DECODE_OK[dtype] = _kernel_works(cpu_kernels.decode_attention, dtype)
    if not _DECODE_OK[dtype]:
        # shown once per message (Python's default warning filter), not once per layer
        warnings.warn("the numba decode-attention kernel failed its check here: using torch's attention")
        return None
    return cpu_kernels.decode_attention


def _kernel_works(kernel: DecodeKernel, dtype: torch.dtype) -> bool:
    """3 rows over a 40-slot cache, a 24-slot window: one row sees a prefix and its own slot, one a pad
    run, one nothing (the kernel must give 0 there, as the fused attention does)."""
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(3, 2, 1, 16, generator=gen).to(dtype)
        keys, values = (torch.randn(3, 2, 40, 16, generator=gen).to(dtype) for _ in range(2))
        slots = torch.arange(24)
        hidden = torch.stack([slots > 20, (slots < 5) | (slots > 17), torch.ones(24, dtype=torch.bool)])
        hidden = hidden.view(3, 1, 1, 24)
        want = attend(q.float(), keys[:, :, :24].float(), values[:, :, :24].float(), hidden, 0)
        got = kernel(q, keys, values, hidden, 1 / math.sqrt(16)).float()
        return bool((got - want).abs().max() <= 0.02 * want.abs().max())
    except Exception:  # noqa: BLE001 - a kernel that fails to build or run is simply not used
        return False
