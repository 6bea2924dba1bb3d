"""Tensor-parallel building blocks, Megatron style; each holds only its rank's shard.

- VocabParallelEmbedding: rank r owns vocab rows [r*V/tp, (r+1)*V/tp); ids outside are zeroed,
  then one all-reduce sums the shards.
- ColumnParallelLinear: output features are split; no communication.
- RowParallelLinear: input features are split; partial outputs are all-reduced, then the
  (replicated) bias is added once.
- GroupedQKVParallelLinear: grouped-query attention's QKV, the rows `partition.GroupedQKV` gives a rank.
A linear may have no bias (ChatGLM2: only QKV has one).

Weights are stored [out, in] as in the checkpoint. A linear may hold an INT8/INT4 weight with
per-row scales (`bits` 8 or 4), laid out as the release's quantized checkpoints store it;
the matmul goes through the kernel `quant.prepare` picks for the device.
Which checkpoint tensor maps to which shard is `partition.py`'s rule; the `layout` attribute
names it for each layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_tp.config import check_lm_head
from glm_tp.kernels import quant
from glm_tp.kernels.formats import quantize_rows
from glm_tp.parallel.dist import TPContext
from glm_tp.parallel.partition import GroupedQKV, Layout


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class VocabParallelEmbedding(nn.Module):
    layout = Layout.COLUMN

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.rows = vocab_size // tp.size
        self.start = tp.rank * self.rows
        self.weight = _param(self.rows, hidden_size, dtype=dtype)
        # the LM head's prepared weight: an INT8 copy when asked for, or the CPU kernel for a bf16 weight
        self.head: quant.PreparedWeight | None = None

    def prepare_head_(self, lm_head: str, kernels: str = "fused") -> None:
        """lm_head "int8": the logits multiply by an INT8 copy of the embedding (per-row scales, as the
        linears; half the bytes of a bf16 head); "model": by the embedding itself, in the model's dtype."""
        check_lm_head(lm_head)
        if lm_head == "int8":
            self.head = quant.prepare(*quantize_rows(self.weight, 8), 8, kernels)
        else:
            self.head = quant.prepare_float(self.weight, kernels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head: this rank's vocab slice of the logits."""
        return self.head.matmul(hidden) if self.head is not None else F.linear(hidden, self.weight)


class _ParallelLinear(nn.Module):
    layout: Layout

    def __init__(self, in_features: int, out_features: int, tp: TPContext, dtype: torch.dtype, bits: int = 0,
                 bias: bool = True):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        if bits:  # the release's quantized layout: int8 [out, in*bits/8] + fp16 scale [out]
            self.weight = nn.Parameter(torch.empty(out_features, in_features * bits // 8, dtype=torch.int8),
                                       requires_grad=False)
            self.weight_scale = _param(out_features, dtype=torch.float16)
        else:
            self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None
        self.prepared: quant.PreparedWeight | None = None

    def prepare_(self, kernels: str = "fused") -> None:
        """Lay a quantized weight out for its kernel, once, after loading (kernels: see config.KERNELS); a
        float weight gets the CPU decode kernel where there is one for it."""
        if self.bits:
            self.prepared = quant.prepare(self.weight, self.weight_scale, self.bits, kernels)
        else:
            self.prepared = quant.prepare_float(self.weight, kernels)

    def load_float_weight_(self, w: torch.Tensor) -> None:
        """Take a float weight shard; a quantized layer quantizes it on its own device first."""
        if not self.bits:
            self.weight.copy_(w)
            return
        q, scale = quantize_rows(w.to(self.weight.device), self.bits)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)
        self.prepared = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepared is None:
            if not self.bits:
                return F.linear(x, self.weight)
            self.prepare_()
        return self.prepared.matmul(x)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class ColumnParallelLinear(_ParallelLinear):
    """y_r = x W_r^T + b_r: each rank computes its slice of the output features."""

    layout = Layout.COLUMN

    def __init__(self, in_features: int, out_features: int, tp: TPContext, dtype: torch.dtype, bits: int = 0,
                 bias: bool = True):
        super().__init__(in_features, out_features // tp.size, tp, dtype, bits, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.matmul(x))


class GLUColumnParallelLinear(ColumnParallelLinear):
    """h->4h of GeGLU: the rank's output is [its value slice ; its gate slice]."""

    layout = Layout.GLU


class RowParallelLinear(_ParallelLinear):
    """y = sum_r x_r W_r^T + b: partial products all-reduced, bias added once afterwards."""

    layout = Layout.ROW

    def __init__(self, in_features: int, out_features: int, tp: TPContext, dtype: torch.dtype, bits: int = 0,
                 bias: bool = True):
        super().__init__(in_features // tp.size, out_features, tp, dtype, bits, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.tp.all_reduce(self.matmul(x)))


class GroupedQKVParallelLinear(_ParallelLinear):
    """Grouped-query QKV: the rank's output is [q of its heads ; k ; v of the KV groups those heads use]."""

    def __init__(self, in_features: int, cut: GroupedQKV, tp: TPContext, dtype: torch.dtype, bits: int = 0,
                 bias: bool = True):
        rows = sum(p.length for p in cut.pieces(tp.size, tp.rank))
        super().__init__(in_features, rows, tp, dtype, bits, bias)
        self.layout = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.matmul(x))
