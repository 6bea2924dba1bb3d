"""Whole models through the native CPU kernels (the default kernels "fused": Q8_0 activations in the decode
GEMVs, the MLP's activation and bias fused into the h->4h GEMV, the bf16 GEMM for prompts over SMALL_ROWS)
against the same weights under kernels "weight-only" fed the same tokens: every MLP kind, INT8 and INT4,
each step's logits within a bound on these tiny random models (hidden 64-128: two to four Q8 blocks per
row, a coarser rounding than a real model's), and the same greedy token wherever the weight-only logits'
margin exceeds what that gap can move."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.kernels import native, quant
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import greedy_blank

pytestmark = pytest.mark.skipif(not native.available() or native.best_isa() == "scalar", reason=native.describe())
pytest.importorskip("numba", reason="the weight-only side runs numba's kernels")

# a prompt over SMALL_ROWS tokens (the prefill's larger batch), then decode steps (one row each)
PROMPT = list(range(5, 5 + quant.SMALL_ROWS + 4))
STEPS = 8
# the largest logit gap, as a fraction of the largest logit, on these tiny models (measured up to 0.035)
TOLERANCE = 0.06


def _masked(logits: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """Never a token already in the sequence: random weights otherwise echo the input."""
    return logits.float().index_fill(0, torch.tensor(seq), float("-inf"))


def _decode(ckpt, bits: int, kernels: str, follow: list[int] | None = None):
    """Greedy decode (or, with `follow`, these tokens); the model, its tokens and the masked logits of each pick."""
    model = load_model(ckpt, dtype="bf16", quant=f"int{bits}", kernels=kernels, progress=False)
    masked = []

    def pick(logits, seq):
        masked.append(_masked(logits, seq))
        return follow[len(masked) - 1] if follow else int(masked[-1].argmax())

    two_d = model.cfg.position_encoding == "2d"
    blank = SimpleNamespace(tokens=PROMPT, positions=[(i, 0) if two_d else i for i in range(len(PROMPT))],
                            bidirectional=0, next_position=(len(PROMPT), 0) if two_d else len(PROMPT), counting=1)
    with torch.inference_mode():
        tokens, _, _ = greedy_blank(model, blank, STEPS, pick=pick, position_dims=2 if two_d else 1)
    return model, tokens, torch.stack(masked)


@pytest.mark.parametrize("preset", ["tiny", "tiny-chatglm", "tiny-chatglm2"])  # GeGLU, tanh-GeLU, SwiGLU
@pytest.mark.parametrize("bits", [8, 4])
def test_the_default_kernels_give_the_weight_only_tokens(tmp_path, preset, bits):
    ckpt = write_random_checkpoint(tmp_path / "ck", PRESETS[preset], 1, torch.float32)
    fast, fast_tokens, fast_logits = _decode(ckpt, bits, "fused")
    block = fast.transformer.layers[0]
    up = block.mlp.dense_h_to_4h.prepared
    assert isinstance(up.small, native.NativeMatmul) and block.mlp.fused  # the native GEMV and its epilogue
    if native.bf16_matmul_fast():
        assert isinstance(up.large, native.DenseMatmul)  # the prompt's larger batch
    _, _, plain_logits = _decode(ckpt, bits, "weight-only", follow=fast_tokens)
    finite = plain_logits.isfinite()
    diff = (fast_logits - plain_logits).where(finite, 0).abs().amax(-1)
    scale = plain_logits.where(finite, 0).abs().amax(-1)
    assert (diff <= TOLERANCE * scale).all() and (diff > 0).any()  # Q8_0 activations really ran
    top2 = plain_logits.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * diff  # a margin the gap cannot close
    assert clear.any()
    assert torch.equal(fast_logits.argmax(-1)[clear], plain_logits.argmax(-1)[clear])
