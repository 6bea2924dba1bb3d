"""The native decode attention (glm_tp/kernels/native_attention.py, csrc/attention.c): every path this CPU
runs against the model's torch ops (attention.decode_attention_reference) and numba's kernel, head-major
(MHA) and grouped (GQA) layouts, several windows, masked slots and a row that sees nothing; then whole tiny
models decoding through it against the same weights through torch's attention."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.kernels import native, native_attention
from glm_tp.model import attention
from tests.model.test_cpu_kernels import greedy_steps
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import greedy_blank

pytestmark = pytest.mark.skipif(not native.available(), reason=native.describe())

# (rotary, query heads, KV heads; query heads 0: head-major): GLM's 1D and 2D NeoX blocks, ChatGLM2's pairs
# over 2 groups of 2 and of 4 heads, 3 groups, one KV head for 8 query heads, one query head per KV head
LAYOUTS = [(1, 0, 3), (2, 0, 2), (attention.PAIRS, 4, 2), (attention.PAIRS, 8, 2), (attention.PAIRS, 6, 3),
           (attention.PAIRS, 8, 1), (attention.PAIRS, 2, 2)]


@pytest.fixture(params=list(native.ISAS))
def isa(request) -> str:
    if not native.supported(request.param):
        pytest.skip(f"this CPU does not run the {native.ISA_NAMES[request.param]} path")
    return request.param


def _case(dtype: torch.dtype, rotary: int, heads: int, kv_heads: int, window: int, d: int, seed: int):
    """4 rows: one near its start, a full window, one behind left padding and a prefix, one that sees
    nothing; slots past the window hold NaN (never read)."""
    gen = torch.Generator().manual_seed(seed)
    rows, slots = 4, window + 16
    qkv = torch.randn(rows, 1, ((heads or kv_heads) + 2 * kv_heads) * d, generator=gen).to(dtype)
    angles = torch.rand(rows, 1, 1, d, generator=gen) * 6
    cache = [torch.randn(rows, kv_heads, slots, d, generator=gen).to(dtype) for _ in range(2)]
    for t in cache:
        t[:, :, window:] = float("nan")
    at = torch.tensor([min(10, window - 1), window - 1, window // 2, 0])
    span = torch.arange(window)
    hidden = torch.stack([span > at[0], span > at[1], (span < window // 8) | ((span > window // 3) & (span < at[2])),
                          span >= 0]).view(rows, 1, 1, window)
    return qkv, angles.cos().to(dtype), angles.sin().to(dtype), at, cache, hidden


@pytest.mark.parametrize("window", [1, 37, 160])
@pytest.mark.parametrize("rotary,heads,kv_heads", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_attention_matches_the_torch_ops(isa, dtype, rotary, heads, kv_heads, window):
    d = 32 if window != 37 else 24  # 24: a head dim that is not a whole vector of 16 lanes
    qkv, cos, sin, at, cache, hidden = _case(dtype, rotary, heads, kv_heads, window, d, window + heads)
    want_cache = [t.float().clone() for t in cache]
    want = attention.decode_attention_reference(qkv.float(), cos.float(), sin.float(), at, *want_cache, hidden,
                                                rotary, heads)
    got = native_attention.decode_attention(qkv, cos, sin, at.view(4, 1), *cache, hidden, rotary, heads, isa=isa)
    assert got.dtype == dtype and got.shape == (4, 1, (heads or kv_heads) * d)
    # fp32 throughout; bf16 rounds the rotated key once (the torch ops three times) and the result once
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    assert ((got.float() - want).abs() <= tol * want.abs().max()).all()
    assert torch.equal(got[3], torch.zeros_like(got[3]))  # no visible key: 0, as torch's attention gives
    rows = torch.arange(4)
    for t, w in zip(cache, want_cache):  # this step's keys and values at each row's slot, nothing else moved
        assert ((t[rows, :, at].float() - w[rows, :, at]).abs() <= tol * w.nan_to_num().abs().max()).all()
        kept = torch.ones(4, t.shape[2], dtype=torch.bool)
        kept[rows, at] = False
        assert torch.equal(t.transpose(1, 2)[kept].float().nan_to_num(), w.transpose(1, 2)[kept].nan_to_num())


@pytest.mark.parametrize("rotary,heads,kv_heads", LAYOUTS[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_attention_matches_numba(isa, dtype, rotary, heads, kv_heads):
    cpu_attention = pytest.importorskip("glm_tp.kernels.cpu_attention", reason="numba is not installed")
    qkv, cos, sin, at, cache, hidden = _case(dtype, rotary, heads, kv_heads, 64, 32, heads)
    numba_cache = [t.clone() for t in cache]
    got = native_attention.decode_attention(qkv, cos, sin, at.view(4, 1), *cache, hidden, rotary, heads, isa=isa)
    want = cpu_attention.decode_attention(qkv, cos, sin, at.view(4, 1), *numba_cache, hidden, rotary, heads)
    tol = 2e-6 if dtype == torch.float32 else 2 ** -7  # fp32 summation order (and one bf16 rounding of it)
    assert ((got.float() - want.float()).abs() <= tol * want.float().abs().max()).all()
    for mine, theirs in zip(cache, numba_cache):
        assert torch.allclose(mine.float().nan_to_num(), theirs.float().nan_to_num(), rtol=tol, atol=tol)


def test_refused_arguments_are_one_line_errors():
    qkv, cos, sin, at, cache, hidden = _case(torch.float32, attention.PAIRS, 4, 2, 8, 16, 0)
    with pytest.raises(ValueError, match="not 6 query and 2 KV heads of 16"):
        native_attention.decode_attention(qkv, cos, sin, at, *cache, hidden, attention.PAIRS, 6)
    with pytest.raises(ValueError, match="a slot outside the 24-slot cache"):
        native_attention.decode_attention(qkv, cos, sin, torch.tensor([0, 1, 24, 2]), *cache, hidden,
                                          attention.PAIRS, 4)
    with pytest.raises(TypeError, match="fp32 or bf16"):
        native_attention.decode_attention(qkv.half(), cos, sin, at, *(t.half() for t in cache), hidden,
                                          attention.PAIRS, 4)
    with pytest.raises(ValueError, match="slots are contiguous"):
        wide = [torch.zeros(4, 2, 24, 32)[..., :16] for _ in cache]  # each slot's row 32 apart
        native_attention.decode_attention(qkv, cos, sin, at, *wide, hidden, attention.PAIRS, 4)


def _native_everywhere(model) -> bool:
    return all(block.attention.decode_kernel is not None
               and block.attention.decode_kernel.func is native_attention.decode_attention
               for block in model.transformer.layers)


def test_a_glm_model_decodes_through_it_as_through_torchs_attention(tiny_checkpoints):
    fast, plain = (load_model(tiny_checkpoints[1], progress=False) for _ in range(2))
    if not _native_everywhere(fast):
        pytest.skip("the native decode attention is not chosen here (portable C path with numba installed)")
    for block in plain.transformer.layers:
        block.attention.decode_kernel = None
    logits = [greedy_steps(model, 6) for model in (fast, plain)]
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 * logits[1].abs().max()


def test_a_grouped_query_model_decodes_through_it_as_through_torchs_attention(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny-chatglm2"], kv_groups=2)
    ckpt = write_random_checkpoint(tmp_path / "glm2", cfg, 1, torch.float32)
    prompt = [5, 6, 7, 8, 9, 10, 11]

    def pick(logits, seq):  # never a token already in the sequence: random weights otherwise echo the input
        return int(logits.float().index_fill(0, torch.tensor(seq), float("-inf")).argmax())

    runs = []
    for native_side in (True, False):
        model = load_model(ckpt, progress=False)
        if native_side and not _native_everywhere(model):
            pytest.skip("the native decode attention is not chosen here (portable C path with numba installed)")
        if not native_side:
            for block in model.transformer.layers:
                block.attention.decode_kernel = None
        blank = SimpleNamespace(tokens=prompt, positions=list(range(len(prompt))), bidirectional=0,
                                next_position=len(prompt), counting=1)
        with torch.inference_mode():
            runs.append(greedy_blank(model, blank, 8, pick=pick))
    (tokens, seen, _), (want_tokens, want_seen, _) = runs
    assert tokens == want_tokens
    got, want = torch.stack(seen), torch.stack(want_seen)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
