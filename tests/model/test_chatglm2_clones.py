"""ChatGLM2/3 and GLM-4 clones in each layout glm-tp reads, random weights written by glm-tp-make-checkpoint, against
transformers' GlmForCausalLM on CPU: logits within fp32 tolerance and the same greedy tokens at TP 1, 2 and 4
(tiny-chatglm2: 3 layers, 8 heads in 2 KV groups, so TP 4 replicates each group on two ranks), loaded through
the normal loader.

- THUDM's layout (transformer.encoder...): the test maps those names onto GlmForCausalLM's itself;
- chatglm2-6b-int4's layout: the reference gets the weights dequantized by the test's own reading of the packing
  (two signed 4-bit values per byte, the even column in the high nibble, w = q x weight_scale[row]);
- transformers' own layout: GlmForCausalLM.from_pretrained reads the clone's files."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from glm_tp import load_model
from tests.model.test_chatglm2_parity import PROMPTS, STEPS, _pick, to_glm_for_causal_lm
from tests.support.checkpoints import write_clone
from tests.support.ranks import greedy_blank, run_ranks

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


def _stored(ckpt) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _unpack_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """THUDM's INT4: byte j of a row holds columns 2j (high nibble) and 2j+1 (low nibble), two's complement."""
    b = packed.to(torch.int16) & 0xFF
    nibbles = torch.stack([b >> 4, b & 0xF], dim=-1).flatten(-2)
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return values.float() * scale.float()[:, None]


THUDM_NAMES = {"embed": "transformer.embedding.word_embeddings.weight", "norm": "transformer.encoder.final_layernorm.weight",
               "head": "transformer.output_layer.weight", "layer": "transformer.encoder.layers.{}.",
               "attention": "self_attention"}


def _thudm_to_glm(stored: dict[str, torch.Tensor], conf: dict) -> dict[str, torch.Tensor]:
    """THUDM's names and fused QKV -> GlmForCausalLM's (INT4 weights dequantized)."""
    weights = {n: _unpack_int4(t, stored[n + "_scale"]) if n + "_scale" in stored else t.float()
               for n, t in stored.items() if not n.endswith("_scale")}
    return to_glm_for_causal_lm(weights, conf["num_layers"], conf["kv_channels"], conf["num_attention_heads"],
                                conf["multi_query_group_num"], THUDM_NAMES)


def _reference_model(ckpt, layout: str):
    if layout == "glm-hf":
        return transformers.GlmForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    conf = json.loads((ckpt / "config.json").read_text())
    config = transformers.GlmConfig(
        vocab_size=conf["padded_vocab_size"], hidden_size=conf["hidden_size"], intermediate_size=conf["ffn_hidden_size"],
        num_hidden_layers=conf["num_layers"], num_attention_heads=conf["num_attention_heads"],
        num_key_value_heads=conf["multi_query_group_num"], head_dim=conf["kv_channels"],
        max_position_embeddings=conf["seq_length"], rms_norm_eps=conf["layernorm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * conf.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        attention_bias=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    ref = transformers.GlmForCausalLM(config).eval()
    ref.load_state_dict(_thudm_to_glm(_stored(ckpt), conf), strict=True)
    return ref


def _reference(ckpt, layout: str) -> list[tuple[list[int], torch.Tensor]]:
    ref, results = _reference_model(ckpt, layout), []
    with torch.no_grad():
        for ids in PROMPTS:  # the whole sequence every step: no cache on this side
            seq, steps = list(ids), []
            for _ in range(STEPS):
                steps.append(ref(torch.tensor([seq])).logits[0, -1].float())
                seq.append(_pick(steps[-1], seq))
            results.append((seq[len(ids):], torch.stack(steps)))
    return results


def _ours(tp, ckpt, bits):
    # quant=None: what the clone holds (INT4 for -int4); "dequant" computes with the dequantized weights in fp32
    model = load_model(ckpt, tp=tp, dtype="fp32", progress=False, kernels="dequant" if bits else "fused")
    assert model.quant_bits == bits and model.cfg.causal and model.cfg.kv_groups == 2
    results = []
    with torch.inference_mode():
        for ids in PROMPTS:
            prompt = SimpleNamespace(tokens=list(ids), positions=list(range(len(ids))), bidirectional=0,
                                     next_position=len(ids), counting=1)
            answer, seen, _ = greedy_blank(model, prompt, STEPS, pick=_pick)
            results.append((answer, torch.stack(seen) if seen else None))
    return results if model.tp.is_first else None


@pytest.mark.parametrize("layout, options, bits", [("chatglm2", (), 0), ("chatglm2", ("--quant", "int4", "--files", "2"), 4),
                                                   ("glm-hf", ("--files", "2"), 0)],
                         ids=["chatglm2", "chatglm2-int4", "glm-hf"])
def test_each_layout_matches_transformers_glm_at_tp_1_2_4(layout, options, bits, tmp_path):
    ckpt = write_clone(tmp_path / "clone", layout, "tiny-chatglm2", *options, seed=4)
    want = _reference(ckpt, layout)
    for tp in (1, 2, 4):
        got = run_ranks(tp, _ours, ckpt, bits)[0]
        for (ref_tokens, ref_steps), (tokens, steps) in zip(want, got):
            diff = (steps - ref_steps).abs().max().item()
            print(f"{layout} INT{bits} TP={tp}: max |logit diff| {diff:.2e}; transformers {ref_tokens}, glm-tp {tokens}")
            assert diff < 1e-4 and tokens == ref_tokens


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device here: the -int4 clone on a GPU is checked on a GPU machine")
def test_an_int4_clone_loads_quantized_on_cuda_and_matches_the_cpu(tmp_path):
    ckpt = write_clone(tmp_path / "clone", "chatglm2", "tiny-chatglm2", "--quant", "int4", seed=4)
    ids = list(PROMPTS[1])
    prompt = SimpleNamespace(tokens=ids, positions=list(range(len(ids))), bidirectional=0, next_position=len(ids),
                             counting=1)
    runs = []
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp16")):
        model = load_model(ckpt, dtype=dtype, device=device, progress=False)
        assert model.quant_bits == 4 and model.device.type == device
        with torch.inference_mode():
            answer, seen, _ = greedy_blank(model, prompt, STEPS, pick=lambda logits, seq: _pick(logits.cpu(), seq))
        runs.append((answer, torch.stack(seen).float().cpu()))
    (cpu_tokens, cpu_logits), (cuda_tokens, cuda_logits) = runs
    assert (cpu_logits[0] - cuda_logits[0]).abs().max().item() < 5e-2  # fp16 against fp32, the same INT4 weights
    assert cuda_tokens[0] == cpu_tokens[0]
