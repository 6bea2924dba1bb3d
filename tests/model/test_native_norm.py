"""The native residual add + norm of CPU decode steps (glm_tp/kernels/native_norm.py, csrc/norm.c): against
the model's torch ops for LayerNorm and RMSNorm, fp32 and bf16, plain and DeepNorm-scaled residuals; then
whole tiny models (post-LN GLM, pre-LN ChatGLM2) decoding through it against the same weights without it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.kernels import native, native_norm
from glm_tp.model.glm import RMSNorm
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import greedy_blank

pytestmark = pytest.mark.skipif(not native.available(), reason=native.describe())


def _norm(kind: str, n: int, dtype: torch.dtype, seed: int) -> nn.Module:
    norm = RMSNorm(n, 1e-5, dtype) if kind == "rms" else nn.LayerNorm(n, eps=1e-5, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1)
    return norm


@pytest.mark.parametrize("alpha", [1.0, (2 * 28) ** 0.5])  # a plain residual; DeepNorm's of a 28-layer model
@pytest.mark.parametrize("rows,n", [(1, 64), (3, 96), (16, 4096)])
@pytest.mark.parametrize("kind", ["rms", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm_matches_the_torch_ops(dtype, kind, rows, n, alpha):
    norm = _norm(kind, n, dtype, rows)
    gen = torch.Generator().manual_seed(n)
    residual, branch = (torch.randn(rows, 1, n, generator=gen).to(dtype) * 4 for _ in range(2))
    got_sum, got = native_norm.AddNorm(norm)(residual, branch, alpha)
    want_sum, want = native_norm.reference(norm, residual, branch, alpha)
    assert torch.equal(got_sum, want_sum)  # the residual stream: the same bits
    # fp32 moments in a different order; bf16: one rounding of the dtype (two for RMSNorm's gain)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert got.dtype == dtype and ((got.float() - want.float()).abs() <= tol * want.float().abs().max()).all()
    assert native_norm.AddNorm(norm)(residual, branch, alpha, want_sum=False)[0] is None


def test_refused_arguments_are_one_line_errors():
    add_norm = native_norm.AddNorm(_norm("rms", 64, torch.float32, 0))
    with pytest.raises(ValueError, match="are not the same rows of 64"):
        add_norm(torch.zeros(1, 1, 64), torch.zeros(1, 1, 32))
    with pytest.raises(TypeError, match="for a torch.float32 norm"):
        add_norm(torch.zeros(1, 1, 64).bfloat16(), torch.zeros(1, 1, 64).bfloat16())


def test_only_cpu_kernels_of_its_dtypes_take_it():
    assert native_norm.kernel(_norm("rms", 64, torch.float32, 0), "torch") is None
    assert native_norm.kernel(_norm("layernorm", 64, torch.float16, 0), "fused") is None
    kernel = native_norm.kernel(_norm("layernorm", 64, torch.bfloat16, 0), "fused")
    assert kernel is not None or native.best_isa() == "scalar"


def _decodes(ckpt, fused: bool) -> tuple[list[int], torch.Tensor, int]:
    """Greedy decode of one prompt (never repeating a token), the logits of each pick, and how many fused
    calls ran."""
    model = load_model(ckpt, progress=False)
    calls = []
    for block in model.transformer.layers:
        kernel = block.add_norm
        assert kernel is not None
        block.add_norm = (lambda *a, kernel=kernel, **k: calls.append(1) or kernel(*a, **k)) if fused else None

    def pick(logits, seq):
        return int(logits.float().index_fill(0, torch.tensor(seq), float("-inf")).argmax())

    prompt = [5, 6, 7, 8, 9, 10, 11]
    blank = SimpleNamespace(tokens=prompt, positions=list(range(len(prompt))), bidirectional=0,
                            next_position=len(prompt), counting=1)
    with torch.inference_mode():
        tokens, seen, _ = greedy_blank(model, blank, 6, position_dims=2 if model.cfg.position_encoding == "2d" else 1,
                                       pick=pick)
    return tokens, torch.stack(seen), len(calls)


@pytest.mark.parametrize("preset", ["tiny", "tiny-chatglm2"])  # post-LN LayerNorm (DeepNorm), pre-LN RMSNorm
def test_a_model_decodes_through_it_as_through_the_torch_ops(tmp_path, preset):
    if native.best_isa() == "scalar":
        pytest.skip("the fused add + norm is not chosen on the portable C path")
    cfg = PRESETS[preset]
    ckpt = write_random_checkpoint(tmp_path / preset, cfg, 1, torch.float32)
    tokens, logits, calls = _decodes(ckpt, True)
    want_tokens, want, _ = _decodes(ckpt, False)
    assert calls == (1 + 6) * cfg.num_layers  # the 7-token prompt (under MAX_ROWS) and 6 steps: one a layer each
    assert tokens == want_tokens and (logits - want).abs().max() <= 1e-5 * want.abs().max()
