"""The numba CPU kernels (the `cpu` extra): results against dequantization, the choice at load, the fallback
to torch's kernels, the q8 and INT8 LM head options. No timings here: tools/bench.py measures speed."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.engine.decoder import Decoder
from glm_tp.kernels import probe, quant
from glm_tp.kernels.formats import dequantize, pack_int4_halves, quantize_rows
from glm_tp.kernels.quant import SMALL_ROWS, prepare
from glm_tp.model import attention
from tests.model.test_model import LAYOUT, POSITIONS, TOKENS
from tests.support import ROOT
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import greedy_blank, run_ranks

pytest.importorskip("numba", reason="the CPU kernels need numba: pip install -e '.[cpu]' (the [test] extra has it)")
from glm_tp.kernels import cpu as cpu_kernels  # noqa: E402
from glm_tp.kernels import cpu_attention  # noqa: E402
from glm_tp.kernels import native, native_attention  # noqa: E402

DECODE_KERNELS = (cpu_attention.decode_attention, native_attention.decode_attention)



def greedy_steps(model, steps: int) -> torch.Tensor:
    """The logits of `steps` greedy decode steps of two rows after test_model's prompts, through the Decoder."""
    with torch.inference_mode():
        decoder = Decoder(model, 2, 40)
        first = decoder.prefill(TOKENS, POSITIONS, torch.tensor([6, 9]), torch.tensor([12, 12]), torch.ones(2))
        out = [decoder.step(first.argmax(-1))]
        out += [decoder.step(out[-1].argmax(-1)) for _ in range(steps - 1)]
        return torch.stack(out)

def _exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return x.double() @ dequantize(q, scale, bits, torch.float64).t()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, SMALL_ROWS])
def test_small_batch_kernels_match_dequantization(bits, rows):
    # INT8: 100 output rows, a partial parallel block (torch's INT4 kernel needs multiples of 16, and the
    # load-time check covers the partial block for INT4); 4-row batch tiles plus a remainder
    torch.manual_seed(rows)
    n = 100 if bits == 8 else 112
    w, x = torch.randn(n, 96) * torch.linspace(0.2, 3, n)[:, None], torch.randn(rows, 96)
    q, scale = quantize_rows(w, bits)
    p = prepare(q, scale, bits, "weight-only")
    assert isinstance(p.small, cpu_kernels.Matmul)  # weight-only numerics on CPU: the numba kernels take small batches
    got, want = p.small(x), _exact(x, q, scale, bits)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()  # fp32 accumulation only
    assert (p.matmul(x.bfloat16()).double() - want).abs().max() <= 0.01 * want.abs().max()  # bf16 in and out
    # bf16 activations are widened exactly and the output rounded to nearest even, as torch rounds
    xb = x.bfloat16()
    assert p.small(xb).dtype == torch.bfloat16 and torch.equal(p.small(xb), p.small(xb.float()).bfloat16())


@pytest.mark.parametrize("rows", [1, 3, SMALL_ROWS])
def test_bf16_weight_kernel_matches_torch(rows):
    torch.manual_seed(rows)
    w = torch.randn(520, 1024).bfloat16()  # 1.02 MiB: just over the size the kernel is used from
    x = torch.randn(rows, 1024)
    p = quant.prepare_float(w)
    assert p is not None and p.kind == "float" and p.small is not None
    exact = x.bfloat16().double() @ w.double().t()
    got = p.matmul(x.bfloat16())
    assert got.dtype == torch.bfloat16
    # fp32 accumulation, then one bf16 rounding (at most half a bf16 step of the result, 2^-9 relative)
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()
    assert (p.small(x).double() - x.double() @ w.double().t()).abs().max() <= 1e-5 * exact.abs().max()
    big = torch.randn(SMALL_ROWS + 1, 1024).bfloat16()
    assert torch.equal(p.matmul(big), torch.nn.functional.linear(big, w))  # larger batches: torch's matmul
    nan = torch.zeros(1, 1024).bfloat16()
    nan[0, 3] = float("nan")
    assert p.matmul(nan)[0].isnan().all()


def test_bf16_weight_kernel_is_used_only_where_it_pays():
    w = torch.randn(520, 1024)
    assert quant.prepare_float(w) is None  # fp32 weights: torch's matmul
    assert quant.prepare_float(w[:100].bfloat16()) is None  # under FLOAT_KERNEL_MIN_BYTES
    assert quant.prepare_float(torch.randn(1040, 513).bfloat16()) is None  # odd input dim: no column pairs
    for kernels in ("torch", "dequant"):
        assert quant.prepare_float(w.bfloat16(), kernels) is None
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        quant.prepare_float(w.bfloat16(), "fast")


def test_a_bf16_model_decodes_through_the_kernels(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(quant, "FLOAT_KERNEL_MIN_BYTES", 0)  # the tiny model's weights are all small
    fast = load_model(tiny_checkpoints[1], dtype="bf16", progress=False)
    plain = load_model(tiny_checkpoints[1], dtype="bf16", progress=False, kernels="torch")
    assert fast.transformer.word_embeddings.head.kind == "float"
    assert all(m.prepared is not None for m in fast.modules() if hasattr(m, "prepared"))
    assert plain.transformer.word_embeddings.head is None
    head = fast.transformer.word_embeddings.head
    kernel, rows_seen = head.small, []
    head.small = lambda x: rows_seen.append(x.shape[0]) or kernel(x)
    with torch.inference_mode():
        cache_a, cache_b = fast.new_cache(2, 16), plain.new_cache(2, 16)
        every = torch.arange(12).expand(2, 12)  # prefill and its logits: 24 rows, over SMALL_ROWS: torch's matmul
        a = fast(TOKENS, POSITIONS, LAYOUT, cache_a, logits_at=every)
        b = plain(TOKENS, POSITIONS, LAYOUT, cache_b, logits_at=every)
        assert torch.equal(a, b)
        nxt = a[:, -1].argmax(-1, keepdim=True)
        pos = POSITIONS[:, -1:] + 1
        a = fast(nxt, pos, LAYOUT, cache_a, start=TOKENS.shape[1])  # a decode step: 2 rows, the kernels
        b = plain(nxt, pos, LAYOUT, cache_b, start=TOKENS.shape[1])
    assert rows_seen == [2]  # only the decode step's two rows went through the LM head's kernel
    assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()


def test_int4_halves_layout_round_trips():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)
    packed = pack_int4_halves(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    half = q.shape[1] // 2
    assert torch.equal((packed & 15).to(torch.int8) - 8, q[:, :half])
    assert torch.equal((packed >> 4).to(torch.int8) - 8, q[:, half:])


@pytest.mark.parametrize("bits", [8, 4])
def test_larger_batches_keep_weight_only_numerics_and_q8_is_an_option(bits):
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(SMALL_ROWS + 5, 128)
    q, scale = quantize_rows(w, bits)
    want = _exact(x, q, scale, bits)
    for kernels in ("fused", "weight-only"):  # torch's kernels or the native bf16 GEMM: bf16 activations
        p = prepare(q, scale, bits, kernels)
        assert not isinstance(p.large, cpu_kernels.Matmul)
        assert (p.matmul(x.bfloat16()).double() - want).abs().max() <= 0.01 * want.abs().max()
    q8 = prepare(q, scale, bits, "q8")
    got = q8.matmul(x).double()
    # Q8_0 activations: each block of 32 rounded to 1/254 of its absmax, so errors of ~0.5 % of a product
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert (got - want).abs().max() > 0  # it really ran the quantized-activation kernel
    assert torch.equal(q8.matmul(x[:1]), q8.small(x[:1]))  # small batches: the option's small kernel
    for kernels in ("torch", "dequant"):
        p = prepare(q, scale, bits, kernels)
        assert p.small is None and p.large is None
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        prepare(q, scale, bits, "fast")


def test_q8_needs_whole_blocks():
    q, scale = quantize_rows(torch.randn(32, 48), 8)  # 48 input columns: not a multiple of 32
    assert cpu_kernels.q8_kernel(q, scale, 8) is None
    x = torch.randn(SMALL_ROWS + 1, 48)
    p = prepare(q, scale, 8, "q8")
    assert (p.matmul(x).double() - _exact(x, q, scale, 8)).abs().max() <= 0.02 * _exact(x, q, scale, 8).abs().max()


@pytest.fixture
def no_native_bf16(monkeypatch):
    """numba's bf16 GEMV rather than the native one (which serves bf16 weights on AVX-512 CPUs): another
    native path asked for (or, where it does not run here, the library off)."""
    from glm_tp.kernels import native

    monkeypatch.setenv(native.ENV, "avx2" if native.supported("avx2") else "off")


def test_without_numba_the_torch_kernels_are_used(monkeypatch, no_native_bf16):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    q, scale = quantize_rows(torch.randn(64, 128), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing optional extra is not worth a warning per weight
        p = prepare(q, scale, 8, "weight-only")
        assert quant.prepare_float(torch.randn(520, 1024).bfloat16()) is None  # bf16 weights: torch's matmul
        kernel = attention.decode_kernel("fused", torch.bfloat16, torch.device("cpu"))  # native's, or torch's
        assert kernel.func is native_attention.decode_attention if native.available() else kernel is None
    assert p.kind == "int8pack" and p.small is None
    with pytest.raises(ValueError, match=r"kernels=q8 needs numba: pip install numba"):
        prepare(q, scale, 8, "q8")


def test_a_kernel_failing_its_check_falls_back_with_a_warning(monkeypatch, no_native_bf16):
    monkeypatch.setitem(probe.RESULTS, ("numba", "cpu", "int4"), False)
    q, scale = quantize_rows(torch.randn(64, 128), 4)
    with pytest.warns(UserWarning, match="numba INT4 CPU kernels failed their check here: using torch's"):
        p = prepare(q, scale, 4, "weight-only")
    assert p.kind == "int4pack" and p.small is None
    monkeypatch.setitem(probe.RESULTS, ("numba", "cpu", "bf16"), False)
    with pytest.warns(UserWarning, match="numba bf16 CPU kernel failed its check here: using torch's matmul"):
        assert quant.prepare_float(torch.randn(520, 1024).bfloat16()) is None


def _check_decode_attention(dtype: torch.dtype, rotary: int, heads: int, kv_heads: int, window: int,
                            cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The kernel against the model's torch ops (in fp32, on copies) for 4 rows; heads 0: head-major."""
    rows, slots, d = 4, window + 16, cos.shape[-1]
    qkv = torch.randn(rows, 1, ((heads or kv_heads) + 2 * kv_heads) * d).to(dtype)
    cache = [torch.randn(rows, kv_heads, slots, d).to(dtype) for _ in range(2)]
    for t in cache:
        t[:, :, window:] = float("nan")  # past the window: never read
    at = torch.tensor([min(10, window - 1), window - 1, window // 2, 0])  # each row's slot
    span = torch.arange(window)
    # a row near its start, a full window, one behind left padding and a prefix, one that sees nothing
    hidden = torch.stack([span > at[0], span > at[1], (span < window // 8) | ((span > window // 3) & (span < at[2])),
                          span >= 0]).view(rows, 1, 1, window)
    want_cache = [t.float().clone() for t in cache]
    want = attention.decode_attention_reference(qkv.float(), cos.float(), sin.float(), at, *want_cache, hidden,
                                                rotary, heads)
    got = cpu_attention.decode_attention(qkv, cos.to(dtype), sin.to(dtype), at.view(rows, 1), *cache, hidden,
                                         rotary, heads)
    assert got.dtype == dtype and got.shape == (rows, 1, (heads or kv_heads) * d)
    # fp32 throughout; bf16 rounds the rotated key once (the torch ops three times) and the result once
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    assert ((got.float() - want).abs() <= tol * want.abs().max()).all()
    assert torch.equal(got[3], torch.zeros_like(got[3]))  # no visible key: 0, as torch's attention gives
    for t, w in zip(cache, want_cache):  # this step's keys and values went in at each row's slot, nothing else
        written = t[torch.arange(rows), :, at].float()
        assert ((written - w[torch.arange(rows), :, at]).abs() <= tol * w.nan_to_num().abs().max()).all()
        kept = torch.ones(rows, slots, dtype=torch.bool)
        kept[torch.arange(rows), at] = False
        assert torch.equal(t.transpose(1, 2)[kept].float().nan_to_num(), w.transpose(1, 2)[kept].nan_to_num())


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_matches_the_torch_ops(dtype, groups):
    torch.manual_seed(groups)
    angles = torch.rand(4, 1, 1, 32) * 6
    _check_decode_attention(dtype, groups, 0, 3, 64, angles.cos(), angles.sin())


# (query heads, KV heads) of a rank: 2 groups of 2 and of 4 heads, 3 groups, one KV head for 4 or 8 query
# heads (TP larger than the groups), one query head per KV head
GQA_SHAPES = [(4, 2), (8, 2), (6, 3), (4, 1), (8, 1), (2, 2)]


@pytest.mark.parametrize("window", [1, 37, 160])
@pytest.mark.parametrize("heads,kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_attention_matches_the_torch_ops(dtype, heads, kv_heads, window):
    # ChatGLM2's own tables: pairs on the first half of the head, the second half passing through
    torch.manual_seed(heads * 10 + kv_heads)
    cfg = dataclasses.replace(PRESETS["tiny-chatglm2"], max_seq_len=4096)
    cos_table, sin_table = attention.rotary_tables(cfg, torch.float32, "cpu")
    cos, sin = attention.rotary_at(cos_table, sin_table, torch.tensor([[3], [window + 200], [1000], [4000]]))
    _check_decode_attention(dtype, attention.PAIRS, heads, kv_heads, window, cos, sin)


def test_the_pass_through_half_of_a_key_is_cached_exactly():
    cfg = PRESETS["tiny-chatglm2"]
    d, heads, kv_heads = cfg.head_dim, 4, 2
    cos, sin = attention.rotary_at(*attention.rotary_tables(cfg, torch.bfloat16, "cpu"), torch.tensor([[50]]))
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * d).bfloat16()
    keys, values = (torch.zeros(1, kv_heads, 8, d, dtype=torch.bfloat16) for _ in range(2))
    cpu_attention.decode_attention(qkv, cos, sin, torch.tensor([[5]]), keys, values,
                                   torch.zeros(1, 1, 1, 8, dtype=torch.bool), attention.PAIRS, heads)
    k = qkv[0, 0, heads * d:(heads + kv_heads) * d].view(kv_heads, d)
    assert torch.equal(keys[0, :, 5, d // 2:], k[:, d // 2:])  # cos 1, sin 0: untouched
    assert not torch.equal(keys[0, :, 5, :d // 2], k[:, :d // 2])  # the rotated half moved
    assert torch.equal(values[0, :, 5], qkv[0, 0, (heads + kv_heads) * d:].view(kv_heads, d))


def test_a_grouped_qkv_of_the_wrong_width_is_refused():
    keys = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="not 4 query and 2 KV heads of 16"):
        cpu_attention.decode_attention(torch.zeros(1, 1, 7 * 16), torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16),
                                       torch.tensor([[0]]), keys, keys.clone(), torch.zeros(1, 1, 1, 8, dtype=torch.bool),
                                       attention.PAIRS, 4)


def test_decode_steps_attend_through_the_kernel(tiny_checkpoints, monkeypatch):
    fast = load_model(tiny_checkpoints[1], progress=False)
    plain = load_model(tiny_checkpoints[1], progress=False, kernels="torch")
    assert all(block.attention.decode_kernel is None for block in plain.transformer.layers)
    calls = []
    for block in fast.transformer.layers:
        kernel = block.attention.decode_kernel
        assert kernel.func in DECODE_KERNELS and kernel.keywords == {"rotary": 1, "heads": 0}
        block.attention.decode_kernel = lambda qkv, *rest, kernel=kernel: calls.append(qkv.shape) or kernel(qkv, *rest)
    logits = [greedy_steps(model, 4) for model in (fast, plain)]
    cfg = fast.cfg
    assert len(calls) == 4 * cfg.num_layers and set(calls) == {(2, 1, 3 * cfg.hidden_size)}  # the steps only
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 * logits[1].abs().max()
    monkeypatch.setitem(probe.RESULTS, ("decode_attention", "cpu", "fp32"), False)
    for isa in native.ISAS:
        monkeypatch.setitem(probe.RESULTS, (f"native-attention-{isa}", "cpu", "fp32"), False)
    with (pytest.warns(UserWarning, match="native decode-attention kernel failed its check here"),
          pytest.warns(UserWarning, match="decode-attention kernel failed its check here: using torch's attention")):
        assert attention.decode_kernel("fused", torch.float32, torch.device("cpu")) is None
    assert attention.decode_kernel("dequant", torch.bfloat16, torch.device("cpu")) is None
    assert attention.decode_kernel("fused", torch.float16, torch.device("cpu")) is None  # fp16: torch's attention
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        attention.decode_kernel("fast", torch.float32, torch.device("cpu"))


def _chatglm2_decodes(tp, ckpt, dtype: str, quant_: str | None) -> list | None:
    """Greedy decodes of two prompts with the new CPU kernels (decode attention, fused SwiGLU) and with the
    torch ops in their place, all else equal (never repeating a token: random weights otherwise echo the
    last input); whether every layer took the attention kernel, and how many SwiGLU epilogues ran."""
    prompts = ([5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19])

    def pick(logits, seq):
        return int(logits.float().index_fill(0, torch.tensor(seq), float("-inf")).argmax())

    out, real, epilogues = [], cpu_kernels.swiglu_kernel, []
    cpu_kernels.swiglu_kernel = lambda *args: epilogues.append(1) or real(*args)
    try:
        for with_kernels in (True, False):
            # weight-only: the numba GEMV and its SwiGLU epilogue (the native ones: test_native_model.py)
            model = load_model(ckpt, tp=tp, dtype=dtype, quant=quant_, progress=False, kernels="weight-only")
            for block in model.transformer.layers if not with_kernels else ():
                block.attention.decode_kernel, block.mlp.fused = None, False
            used = [block.attention.decode_kernel is not None for block in model.transformer.layers]
            epilogues.clear()  # not the load-time check's
            with torch.inference_mode():
                runs = [greedy_blank(model, SimpleNamespace(tokens=list(ids), positions=list(range(len(ids))), bidirectional=0,
                                                            next_position=len(ids), counting=1), 8, pick=pick)
                        for ids in prompts]
            out.append((used, len(epilogues), [t for t, _, _ in runs], [torch.stack(s) for _, s, _ in runs if s]))
    finally:
        cpu_kernels.swiglu_kernel = real
    return out if model.tp.is_first else None


@pytest.mark.parametrize("tp,dtype,quant_", [(1, "fp32", None), (1, "bf16", None), (4, "fp32", None),
                                             (1, "bf16", "int8"), (2, "fp32", "int4")])
def test_a_chatglm2_decode_gives_the_same_tokens_with_the_kernels_and_without(tmp_path, tp, dtype, quant_):
    # TP 4 on 2 KV groups: each rank caches one KV head for its 2 query heads. The tiny float weights are
    # too small for the bf16 GEMV (torch's matmul and SwiGLU ops); quantized ones fuse SwiGLU into it
    ckpt = write_random_checkpoint(tmp_path / "ck", PRESETS["tiny-chatglm2"], 1, torch.float32)
    fast, plain = run_ranks(tp, _chatglm2_decodes, ckpt, dtype, quant_)[0] if tp > 1 else \
        _chatglm2_decodes(None, ckpt, dtype, quant_)
    assert all(fast[0]) and not any(plain[0])  # every layer's decode steps through the kernel
    layers = PRESETS["tiny-chatglm2"].num_layers
    # every MLP call: 8 steps and the prompt (<= SMALL_ROWS tokens: the GEMV too) of each of 2 decodes
    assert fast[1] == (2 * 9 * layers if quant_ else 0) and plain[1] == 0
    assert fast[2] == plain[2] and len(fast[2][0]) == 8
    tol = 1e-4 if dtype == "fp32" else 0.03
    for a, b in zip(fast[3], plain[3]):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("rows", [1, 5, SMALL_ROWS])
def test_fused_swiglu_matches_the_torch_ops(bits, rows, no_native_bf16):
    torch.manual_seed(bits + rows)
    f, k = 520, 1024  # bf16: 2 x 520 rows of 1024, just over the size the bf16 GEMV is used from
    w, x, bias = torch.randn(2 * f, k) / 16, torch.randn(rows, k), torch.randn(2 * f)
    if bits == 16:
        p, dense = quant.prepare_float(w.bfloat16()), w.bfloat16().double()
    else:
        q, scale = quantize_rows(w, bits)
        p, dense = prepare(q, scale, bits, "weight-only"), dequantize(q, scale, bits, torch.float64)
    for xd, b, tol in ((x, None, 1e-5), (x.bfloat16(), bias.bfloat16(), 2 ** -7)):
        want = quant.swiglu(xd.double() @ dense.t() + (0 if b is None else b.double()))
        got = p.swiglu(xd, b)
        assert got.dtype == xd.dtype and got.shape == (rows, f)
        assert ((got.double() - want).abs() <= tol * want.abs().max()).all()  # fp32 inside, one rounding
    assert p.swiglu(torch.randn(SMALL_ROWS + 1, k), None) is None  # prefill: the torch ops
    assert p.swiglu(x.half(), None) is None
    assert quant.fused_swiglu("fused", torch.bfloat16, torch.device("cpu"))
    assert not quant.fused_swiglu("torch", torch.bfloat16, torch.device("cpu"))
    assert not quant.fused_swiglu("fused", torch.float16, torch.device("cpu"))


def test_a_failing_swiglu_epilogue_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setitem(probe.RESULTS, ("swiglu", "cpu", "bf16"), False)
    with pytest.warns(UserWarning, match="numba SwiGLU epilogue failed its check here: using torch's silu"):
        assert not quant.fused_swiglu("fused", torch.bfloat16, torch.device("cpu"))


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(TOKENS, POSITIONS, LAYOUT, model.new_cache(2, 16), logits_at=torch.arange(12).expand(2, 12))


def test_int8_lm_head_stays_near_the_model_dtype_head(tiny_checkpoints):
    plain = load_model(tiny_checkpoints[1], quant="int8", progress=False)
    head = load_model(tiny_checkpoints[1], quant="int8", progress=False, lm_head="int8")
    assert head.transformer.word_embeddings.head is not None and plain.transformer.word_embeddings.head is None
    a, b = _logits(plain), _logits(head)
    err = (a - b).abs().max() / a.abs().max()
    print(f"INT8 LM head: max |logit diff| = {err:.3%} of the largest logit")
    assert 0 < err < 0.01
    with pytest.raises(ValueError, match="unknown lm_head 'int4': use one of model, int8"):
        load_model(tiny_checkpoints[1], progress=False, lm_head="int4")


def test_an_untied_lm_head_is_the_one_made_int8(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "chatglm", PRESETS["tiny-chatglm"], 1, torch.float32)
    plain = load_model(ckpt, progress=False)
    head = load_model(ckpt, progress=False, lm_head="int8")
    assert head.lm_head.head is not None and head.transformer.word_embeddings.head is None
    positions = torch.stack([POSITIONS, torch.zeros_like(POSITIONS)], dim=-1)  # ChatGLM's 2D positions
    with torch.inference_mode():
        a, b = (m(TOKENS, positions, LAYOUT, None, logits_at=torch.arange(12).expand(2, 12)) for m in (plain, head))
    assert 0 < (a - b).abs().max() / a.abs().max() < 0.05  # the logits go through the INT8 head (~1 % here)


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    code = "import glm_tp, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=env if given is None else {**env, "OMP_WAIT_POLICY": given})
        assert res.returncode == 0 and res.stdout.strip() == want, res.stderr[-500:]
