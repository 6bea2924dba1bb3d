"""The native library's bf16-GEMM path for larger CPU batches (native.DenseMatmul): the weight's integer
values unpacked to bf16 exactly, the product equal to torch's bf16 GEMM on them, within a bf16 rounding of
dequantization, and chosen for the larger batches of kernels "fused" and "weight-only"."""
from __future__ import annotations

import pytest
import torch

from glm_tp.kernels import native, quant
from glm_tp.kernels.formats import dequantize, int_values, quantize_rows

pytestmark = pytest.mark.skipif(not native.available(), reason=native.describe())


def _weight(n: int, k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + bits)) * torch.linspace(0.2, 3, n)[:, None]
    return quantize_rows(w, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_unpacked_rows_are_the_weights_integer_values(bits):
    q, scale = _weight(100, 128, bits)
    dense = native.DenseMatmul(native.NativeMatmul(q, scale, bits))
    out = torch.empty(60, 128, dtype=torch.bfloat16)
    for threads in (1, 2):
        got = dense.weight(37, 97, out, threads)  # a range that starts and ends inside a thread's 16-row unit
        assert torch.equal(got.float(), int_values(q, bits)[37:97].float())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("chunk_rows", [16, 48, 1000])  # several chunks (the last partial), and one
def test_product_is_torchs_bf16_gemm_on_the_integer_values(bits, chunk_rows):
    q, scale = _weight(100, 128, bits)
    mm = native.DenseMatmul(native.NativeMatmul(q, scale, bits), chunk_bytes=chunk_rows * 128 * 2)
    x = torch.randn(2, 20, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    got = mm(x)
    assert got.shape == (2, 20, 100) and got.dtype == torch.bfloat16
    ints = int_values(q, bits).bfloat16()
    want = (torch.mm(x.reshape(40, 128), ints.t()).float() * scale.float()).bfloat16().reshape(2, 20, 100)
    assert torch.equal(got, want)
    exact = x.float() @ dequantize(q, scale, bits, torch.float32).t()
    assert (got.float() - exact).abs().max() <= 0.01 * exact.abs().max()


@pytest.mark.skipif(not native.bf16_matmul_fast(), reason="no bf16 matrix instructions here: torch's kernels serve large batches")
@pytest.mark.parametrize("kernels", ["fused", "weight-only"])
def test_larger_batches_go_to_the_bf16_gemm(kernels):
    pytest.importorskip("numba")
    q, scale = _weight(64, 256, 8)
    p = quant.prepare(q, scale, 8, kernels)
    assert isinstance(p.large, native.DenseMatmul)
    x = torch.randn(quant.SMALL_ROWS + 5, 256, generator=torch.Generator().manual_seed(0))
    exact = x @ dequantize(q, scale, 8, torch.float32).t()
    assert (p.matmul(x) - exact).abs().max() <= 0.01 * exact.abs().max()
    assert not isinstance(quant.prepare(q, scale, 8, "q8").large, native.DenseMatmul)  # q8: integer kernel
