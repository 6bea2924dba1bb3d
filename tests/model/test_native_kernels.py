"""The compiled CPU GEMV kernels (glm_tp/kernels/native.py): every path this CPU runs, against the torch
definition of the Q8-activation computation (equal up to fp32 summation order, with a bound computed from
the terms) and against weight-only dequantization (within the bound the activation rounding allows).
No timings here: tools/bench_native.py measures speed."""
from __future__ import annotations

import pytest
import torch

from glm_tp.kernels import native
from glm_tp.kernels.formats import dequantize, int_values, quantize_rows

pytestmark = pytest.mark.skipif(not native.available(), reason=native.describe())

EPS32 = 2.0 ** -24


@pytest.fixture(params=list(native.ISAS))
def isa(request) -> str:
    if not native.supported(request.param):
        pytest.skip(f"this CPU does not run the {native.ISA_NAMES[request.param]} path")
    return request.param


def _weight(n: int, k: int, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.2, 3, n)[:, None]
    w[3] = 0  # an all-zero row: scale 0
    return quantize_rows(w, bits)


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 2
    x[0, 32:64] = 0  # an all-zero block: scale 0
    return x


def _summation_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The SIMD paths sum in fp32 one term per 4 columns (an int32 lane: exact) times its block scale, in
    some order, then apply the row scale: |error| <= (k/4 + 2) eps sum |lane terms| |s|."""
    xq, d = native.q8_quantize_reference(x)
    w = int_values(q, bits).double().reshape(q.shape[0], -1, 4)
    lanes = torch.einsum("mlj,nlj->mnl", xq.double().reshape(x.shape[0], -1, 4), w)
    terms = lanes.abs() * d.double().repeat_interleave(8, dim=-1)[:, None, :]
    return (terms.shape[-1] + 2) * EPS32 * terms.sum(-1) * scale.double().abs() + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_equals_torch_definition(isa, dtype):
    x = _activations(5, 256, 0).to(dtype)
    xq, d = native.quantize_q8(x, isa)
    want_q, want_d = native.q8_quantize_reference(x)
    assert torch.equal(xq, want_q.reshape(5, 256)) and torch.equal(d, want_d)


# INT8 k=96 and INT4 k=320: a 32-column tail after the AVX-512 path's 64-byte steps; n=100: a partial part
@pytest.mark.parametrize("bits,n,k", [(8, 100, 96), (8, 64, 2048), (4, 100, 320), (4, 48, 2048)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
def test_equals_q8_reference_up_to_fp32_summation(isa, bits, n, k, rows):
    q, scale = _weight(n, k, bits, rows)
    x = _activations(rows, k, rows)
    got = native.NativeMatmul(q, scale, bits, isa)(x, threads=2)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    want = native.q8_reference(x, q, scale, bits)
    assert ((got.double() - want).abs() <= _summation_bound(x, q, scale, bits)).all()
    assert (got[:, 3] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_stays_within_the_activation_rounding_of_dequantization(isa, bits):
    # rounding x to its block's grid moves each column by at most d_b / 2, so
    # |y - x @ W^T| <= sum_b d_b / 2 * sum_{j in b} |W_nj| (+ fp32 summation); measured: ~0.5 % of max |y|
    n, k, rows = 96, 512, 6
    q, scale = _weight(n, k, bits, 7)
    x = _activations(rows, k, 7)
    got = native.NativeMatmul(q, scale, bits, isa)(x).double()
    w = dequantize(q, scale, bits, torch.float64)
    want = x.double() @ w.t()
    _, d = native.q8_quantize_reference(x)
    bound = 0.5 * torch.einsum("mb,nb->mn", d.double(), w.abs().reshape(n, -1, 32).sum(-1))
    assert ((got - want).abs() <= bound + _summation_bound(x, q, scale, bits)).all()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_activations_come_out_as_bf16_rounded_to_nearest_even(isa, bits):
    q, scale = _weight(64, 256, bits, 3)
    mm = native.NativeMatmul(q, scale, bits, isa)
    xb = _activations(4, 256, 3).bfloat16()
    got = mm(xb)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, mm(xb.float()).bfloat16())  # same int sums, one rounding as torch rounds


def test_paths_and_thread_counts_agree(isa):
    # each output is one thread's sum whatever the split: bit-identical across thread counts and calls
    q, scale = _weight(200, 1024, 8, 5)
    x = _activations(3, 1024, 5)
    mm = native.NativeMatmul(q, scale, 8, isa)
    one = mm(x, threads=1)
    for _ in range(50):  # wake the pool's workers again and again
        assert torch.equal(mm(x, threads=2), one)
    assert torch.equal(mm(x, threads=7), one)  # more threads than cores, or than 16-row parts


def test_leading_dims_and_non_contiguous_activations():
    q, scale = _weight(64, 128, 4, 9)
    mm = native.NativeMatmul(q, scale, 4)
    x = _activations(128, 6, 9).t()  # [6, 128], not contiguous
    assert torch.equal(mm(x.reshape(2, 3, 128)), mm(x.contiguous()).reshape(2, 3, 64))


def test_shapes_and_types_it_cannot_take_are_refused():
    q8, s8 = _weight(16, 80, 8, 0)  # 80 columns: not whole blocks of 32
    with pytest.raises(ValueError, match="multiple of 32"):
        native.NativeMatmul(q8, s8, 8)
    q4, s4 = _weight(16, 96, 4, 0)  # INT4 halves of 48 columns: not whole blocks
    with pytest.raises(ValueError, match="multiple of 64"):
        native.NativeMatmul(q4, s4, 4)
    q, s = _weight(16, 64, 8, 0)
    mm = native.NativeMatmul(q, s, 8)
    with pytest.raises(ValueError, match="columns"):
        mm(torch.randn(2, 96))
    with pytest.raises(TypeError):  # the library's own dtypes (NativeMatmul widens others to fp32 first)
        native.quantize_q8(torch.randn(2, 64, dtype=torch.float16))
    with pytest.raises(TypeError):
        native.NativeMatmul(int_values(q, 8).to(torch.int16), s, 8)
    # the library refuses what the wrapper would (a caller going around it gets -1, not a wrong answer)
    lib = native._load()[0]
    out = torch.empty(2, 16)
    x = torch.randn(2, 80)
    assert lib.glm_gemv(native.ISAS["scalar"], 8, q8.data_ptr(), s8.float().data_ptr(), 16, 80, x.data_ptr(),
                        0, 2, out.data_ptr(), 0, 1, None, 0) == -1
    x = torch.randn(2, 64)
    for n, act in ((16, 9), (15, native.ACTIVATIONS["swiglu"])):  # an unknown epilogue; a GLU of odd width
        assert lib.glm_gemv(native.ISAS["scalar"], 8, q.data_ptr(), s.float().data_ptr(), n, 64, x.data_ptr(),
                            0, 2, out.data_ptr(), 0, 1, None, act) == -1


def test_the_path_is_chosen_by_environment_and_said_in_one_line(monkeypatch):
    line = native.describe()
    assert "\n" not in line and native.ISA_NAMES[native.best_isa()] in line
    monkeypatch.setenv(native.ENV, "scalar")
    assert native.best_isa() == "scalar" and "portable C" in native.describe()
    monkeypatch.setenv(native.ENV, "sse9")
    with pytest.raises(ValueError, match="sse9"):
        native.best_isa()
    monkeypatch.setenv(native.ENV, "off")
    monkeypatch.setattr(native, "_lib", [])  # the library is looked up once per process
    assert not native.available() and "turned off" in native.describe()
    monkeypatch.setattr(native, "_lib", [])
    monkeypatch.delenv(native.ENV)
    assert native.available()


@pytest.mark.parametrize("kernels", ["fused", "q8"])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_default_and_q8_send_small_batches_to_the_native_kernel(bits, kernels):
    pytest.importorskip("numba", reason="kernels=q8 needs numba: pip install -e '.[cpu]' (the [test] extra has it)")
    from glm_tp.kernels import quant

    q, scale = _weight(64, 256, bits, 11)
    p = quant.prepare(q, scale, bits, kernels=kernels)
    assert isinstance(p.small, native.NativeMatmul)
    x = _activations(quant.SMALL_ROWS, 256, 11)
    want = native.q8_reference(x, q, scale, bits)
    assert ((p.matmul(x).double() - want).abs() <= _summation_bound(x, q, scale, bits)).all()
    assert p.matmul(x.half()).dtype == torch.float16  # other dtypes go through fp32
    # weight-only numerics: the numba GEMV (fp32 activations) for the same batch
    plain = quant.prepare(q, scale, bits, kernels="weight-only")
    assert not isinstance(plain.small, native.NativeMatmul)
    dense = x @ dequantize(q, scale, bits, torch.float32).t()
    assert (plain.matmul(x) - dense).abs().max() <= 1e-4 * dense.abs().max()
    odd, odd_scale = _weight(64, 96, 4, 0)  # INT4 halves of 48 columns: the numba kernel serves it
    assert native.small_kernel(odd, odd_scale, 4) is None


def test_the_portable_path_serves_a_weight_only_when_asked_for(monkeypatch):
    q, scale = _weight(64, 256, 8, 0)
    monkeypatch.setattr(native, "best_isa", lambda: "scalar")  # a CPU without AVX2: numba's kernels are faster
    assert native.small_kernel(q, scale, 8) is None
    monkeypatch.setenv(native.ENV, "scalar")
    assert native.small_kernel(q, scale, 8).isa == native.ISAS["scalar"]


@pytest.mark.parametrize("act", list(native.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,rows", [(8, 1), (8, 9), (4, 3)])
def test_epilogues_equal_their_torch_definition(isa, act, dtype, bits, rows, monkeypatch):
    monkeypatch.setenv(native.ENV, isa)
    q, scale = _weight(96, 128, bits, rows)
    mm = native.NativeMatmul(q, scale, bits, isa)
    x, bias = _activations(rows, 128, rows).to(dtype), torch.randn(96)
    y = mm(x.float()).double() + bias.double()  # the kernel's own fp32 GEMV (its Q8 rounding), then the bias
    want = native.activation_reference(y, act)
    got = mm(x, None, bias, act)
    assert got.dtype == dtype and got.shape == (rows, 48 if act != "gelu" else 96)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8  # fp32 inside, one rounding
    assert ((got.double() - want).abs() <= tol * want.abs().max() + 1e-6).all()
    assert torch.equal(mm(x, None, None, None), mm(x))  # no epilogue: the plain GEMV
    plus = mm(x.float(), None, bias, None)
    assert (plus.double() - y).abs().max() <= 1e-5 * y.abs().max()  # a bias alone


@pytest.mark.skipif(not native.supported("vnni"), reason="the native bf16 GEMV runs on AVX-512 CPUs")
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
def test_bf16_gemv_equals_fp32_on_the_exact_values(rows):
    from glm_tp.kernels import quant

    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(100, 96, generator=gen).bfloat16()  # 100 rows: a partial 16-row part; 3 blocks of 32
    mm = native.NativeBF16Matmul(w)
    x = torch.randn(rows, 96, generator=gen)
    exact = x.double() @ w.double().t()
    got = mm(x)
    assert got.dtype == torch.float32 and (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    xb = x.bfloat16()  # bf16 in: widened exactly, the output rounded once to nearest even
    assert mm(xb).dtype == torch.bfloat16 and torch.equal(mm(xb), mm(xb.float()).bfloat16())
    assert mm(x.half()).dtype == torch.float16
    with pytest.raises(ValueError):
        native.NativeBF16Matmul(torch.randn(8, 48).bfloat16())  # not whole blocks of 32
    head = torch.randn(520, 1024, generator=gen).bfloat16()  # over quant.FLOAT_KERNEL_MIN_BYTES
    assert isinstance(quant.prepare_float(head).small, native.NativeBF16Matmul)
