"""INT8/INT4 weight-only quantization: the release's bit layout, kernels (and the engine's tokens through the fused
ones), models at several TP sizes."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from glm_tp import CheckpointError, load_model
from glm_tp.checkpoints.release import open_shard
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.kernels.formats import dequantize, pack_int4, quantize_rows, unpack_int4
from glm_tp.kernels.quant import dequant_linear, prepare
from tests.model.test_model import LAYOUT, POSITIONS, TOKENS
from tests.support import ROOT
from tests.support.engines import engine_for
from tests.support.ranks import run_ranks


def test_int4_packing_nibble_order_and_sign_extension():
    q = torch.tensor([[1, -2, -8, 7, 0, -1]], dtype=torch.int8)
    packed = pack_int4(q)
    # column 2j in the high nibble, 2j+1 in the low one
    assert packed.tolist() == [[0x1E, 0x87 - 256, 0x0F]]  # (1, -2), (-8, 7), (0, -1) as signed bytes
    assert torch.equal(unpack_int4(packed), q)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


def test_quantize_rows_is_the_reference_formula():
    w = torch.randn(48, 64) * torch.linspace(0.1, 3, 48)[:, None]
    for bits, qmax in ((8, 127), (4, 7)):
        q, scale = quantize_rows(w, bits)
        # the reference, in its fp16 arithmetic: scale = absmax / (2^(b-1) - 1); q = round(w / scale)
        w16 = w.half()
        want_scale = (w16.abs().max(dim=-1).values / qmax).half()
        want_q = torch.round(w16 / want_scale[:, None]).to(torch.int8)
        assert scale.dtype == torch.float16 and torch.equal(scale, want_scale)  # one scale per row
        values = unpack_int4(q) if bits == 4 else q
        assert torch.equal(values, want_q) and values.min() >= -qmax  # INT4 never produces -8
        err = (dequantize(q, scale, bits, torch.float32) - w).abs()
        assert (err <= scale.float()[:, None] / 2 + 1e-3 * w.abs()).all()  # half a step (+fp16 rounding)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_kernel_matches_dequantize(bits):
    w, x = torch.randn(96, 128), torch.randn(5, 128)
    q, scale = quantize_rows(w, bits)
    fused, plain = prepare(q, scale, bits), prepare(q, scale, bits, "dequant")
    assert fused.kind == ("int8pack" if bits == 8 else "int4pack") and plain.kind == "dequant"
    got, want = fused.matmul(x), plain.matmul(x)
    # bf16 activations in the fused kernel: agreement within bf16 rounding
    assert (got - want).abs().max() <= 0.01 * want.abs().max()
    # and the error against the unquantized product stays within the scheme's bound |x| . step/2
    bound = (x.abs() @ (scale.float()[:, None] / 2).expand(-1, 128).t()) * 1.05 + 0.05
    assert ((want - x @ w.t()).abs() <= bound).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_kernels_apply_the_fp16_row_scales_exactly(bits):
    # bf16 activations round every output a little, but no row may be biased: the fp16 scales are not
    # rounded to bf16 (which would shift whole rows by up to 0.2 %)
    torch.manual_seed(0)
    w = torch.randn(256, 128) * torch.linspace(0.5, 2, 256)[:, None]
    x = torch.randn(512, 128).bfloat16().float()
    q, scale = quantize_rows(w, bits)
    got, want = prepare(q, scale, bits).matmul(x), prepare(q, scale, bits, "dequant").matmul(x)
    keep = want.abs() > 0.5
    row_bias = torch.where(keep, got / want - 1, 0).sum(0) / keep.sum(0)
    assert row_bias.abs().max() < 4e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_the_expression_cuda_compiles_is_the_dequantized_matmul(bits):
    w, x = torch.randn(96, 128), torch.randn(3, 128, dtype=torch.float64)
    q, scale = quantize_rows(w, bits)
    got = dequant_linear(x, q, scale, bits)
    want = x @ dequantize(q, scale, bits, torch.float64).t()
    assert (got - want).abs().max() < 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU kernels run on a GPU machine only")
def test_cuda_kernels_match_dequantize_on_gpu():
    for bits in (8, 4):
        w = torch.randn(256, 512, device="cuda")
        q, scale = quantize_rows(w, bits)
        fused = prepare(q, scale, bits)
        assert fused.kind in ("compiled", "int4pack")
        for rows in (1, 4, 64):  # decode-sized batches and a prefill
            x = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
            got = fused.matmul(x).float()
            want = prepare(q, scale, bits, "dequant").matmul(x.float())
            assert (got - want).abs().max() <= 0.02 * want.abs().max()


def _quantized_logits(tp, ckpt, bits):
    model = load_model(ckpt, tp=tp, quant=f"int{bits}", progress=False)
    with torch.inference_mode():
        return model(TOKENS, POSITIONS, LAYOUT, model.new_cache(2, 16), logits_at=torch.arange(12).expand(2, 12))


def test_quantized_models_agree_across_tp_and_stay_near_fp32(tiny_checkpoints):
    fp32 = run_ranks(1, _float_logits, tiny_checkpoints[1])[0]
    scale = fp32.abs().max().item()
    for bits, rel in ((8, 0.01), (4, 0.15)):
        by_tp = {tp: run_ranks(tp, _quantized_logits, tiny_checkpoints[tp], bits)[0] for tp in (1, 2, 4)}
        err = (by_tp[1] - fp32).abs().max().item()
        print(f"INT{bits}: max |logit - fp32| = {err:.4f} ({err / scale:.2%} of the largest logit)")
        assert err < rel * scale
        for tp in (2, 4):
            # row-parallel scales cover each rank's input slice, so TP sizes differ by rounding only:
            # no more than the quantization error itself
            diff = (by_tp[tp] - by_tp[1]).abs().max().item()
            print(f"INT{bits}: TP={tp} vs TP=1 max |diff| = {diff:.4f}")
            assert diff < 1.5 * err, (bits, tp)
        assert (by_tp[1].argmax(-1) == fp32.argmax(-1)).float().mean() > (0.9 if bits == 8 else 0.6)


def _float_logits(tp, ckpt):
    model = load_model(ckpt, tp=tp, progress=False)
    with torch.inference_mode():
        return model(TOKENS, POSITIONS, LAYOUT, model.new_cache(2, 16), logits_at=torch.arange(12).expand(2, 12))


def test_fused_kernels_give_the_plain_path_tokens(tiny_checkpoints, tiny_tokenizer_file):
    prompts = [Request(str(i), p) for i, p in enumerate(["the quick [MASK] fox", "one two three [gMASK]"])]
    for bits in (8, 4):
        model = load_model(tiny_checkpoints[1], quant=f"int{bits}", progress=False)
        kinds = {m.prepared.kind for m in model.modules() if getattr(m, "prepared", None) is not None}
        assert kinds == {"int8pack" if bits == 8 else "int4pack"}
        engine = engine_for(model, tiny_tokenizer_file, default=GenerationConfig(max_new_tokens=6))
        fast = engine.generate(prompts)
        for m in model.modules():
            if getattr(m, "bits", 0):
                m.prepare_("dequant")  # plain dequantize + matmul
        plain = engine.generate(prompts)
        assert [r.token_ids for r in fast] == [r.token_ids for r in plain]


def test_biases_survive_quantization_at_load(tiny_checkpoints):
    model = load_model(tiny_checkpoints[1], quant="int8", progress=False)
    state, _ = open_shard(tiny_checkpoints[1] / "1" / "mp_rank_00_model_states.pt")
    for name, t in model.state_dict().items():
        if name.endswith(".bias"):
            assert torch.equal(t, state[name]), name
    assert model.transformer.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.int8


def test_offline_quantized_checkpoint_loads_and_refuses_other_precisions(tiny_checkpoints, tmp_path):
    dst = tmp_path / "int4"
    res = subprocess.run([sys.executable, "tools/quantize.py", str(tiny_checkpoints[1]), str(dst), "--bits", "4"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    state, _ = open_shard(dst / "1" / "mp_rank_00_model_states.pt")
    # exactly the release's quantized tensors: int8 weight + fp16 weight_scale for the four linears only
    scales = sorted(k.split("layers.0.")[1] for k in state if k.endswith("_scale") and "layers.0." in k)
    assert scales == ["attention.dense.weight_scale", "attention.query_key_value.weight_scale",
                      "mlp.dense_4h_to_h.weight_scale", "mlp.dense_h_to_4h.weight_scale"]
    assert state["transformer.layers.0.attention.query_key_value.weight"].shape == (192, 32)
    assert state["transformer.word_embeddings.weight"].dtype == torch.float32
    offline = load_model(dst, progress=False)  # bits detected from the checkpoint
    at_load = load_model(tiny_checkpoints[1], quant="int4", progress=False)
    for (name, a), b in zip(offline.state_dict().items(), at_load.state_dict().values()):
        assert torch.equal(a, b), name  # offline and at-load quantization write the same bytes
    for asked in ("int8", "none"):
        with pytest.raises(CheckpointError) as err:
            load_model(dst, quant=asked, progress=False)
        assert "holds INT4 weights" in str(err.value) and "quant=int4" in str(err.value)
    (dst / "glm_tp.json").unlink()  # the official release has no metadata: the tensors tell INT4
    assert load_model(dst, model="tiny", progress=False).quant_bits == 4
