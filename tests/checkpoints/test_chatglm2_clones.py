"""ChatGLM2/3 and GLM-4 clones: config.json (THUDM's or transformers') and the tokenizer files give the model with
no preset; the tensors are served under glm-tp's names (names.py) to the loader and to repartition; -int4's
packed weights load as they are at any TP; a missing file is one line naming it."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from glm_tp import SeqLayout, load_model
from glm_tp.checkpoints import names
from glm_tp.checkpoints.hf import config_metadata
from glm_tp.checkpoints.release import CheckpointError, read_metadata
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.checkpoints.sources import FusedRows, open_source
from glm_tp.config import GLM4_SPECIALS, PRESETS, ModelConfig
from glm_tp.parallel.dist import simulated_rank
from glm_tp.parallel.partition import full_shapes, is_ignored
from tests.support.checkpoints import write_clone

# the released config.json files (their keys that glm-tp reads, and a few it does not)
CHATGLM2_6B = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True,
               "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
               "ffn_hidden_size": 13696, "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05,
               "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28,
               "original_rope": True, "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True,
               "seq_length": 32768, "torch_dtype": "float16", "eos_token_id": 2, "pad_token_id": 0}
GLM4_9B_CHAT = {**CHATGLM2_6B, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072,
                "layernorm_epsilon": 1.5625e-07, "rope_ratio": 500, "torch_dtype": "bfloat16",
                "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329}
GLM4_DECODER = {str(151329 + i): {"content": name, "special": True} for i, name in enumerate(GLM4_SPECIALS)}


def _clone(tmp_path, conf: dict, **files: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    for name, text in files.items():
        (tmp_path / name.replace("__", ".")).write_text(text)
    return config_metadata(tmp_path)


def test_the_released_config_files_read_as_the_presets_with_no_preset(tmp_path):
    meta = _clone(tmp_path / "c2", CHATGLM2_6B)  # no tokenizer files: the released tokenizer's ids
    assert ModelConfig.from_dict(meta["model"]) == PRESETS["chatglm2-6b"] and meta["quant_bits"] == 0
    assert meta["tensor_names"] == "chatglm2" and meta["dtype"] == "fp16"
    meta = _clone(tmp_path / "int4", {**CHATGLM2_6B, "quantization_bit": 4, "pre_seq_len": None})
    assert ModelConfig.from_dict(meta["model"]) == PRESETS["chatglm2-6b"] and meta["quant_bits"] == 4
    # ChatGLM3: the same files, its tokenizer_config.json names the role tokens (here in its chat template)
    meta = _clone(tmp_path / "c3", {**CHATGLM2_6B, "seq_length": 8192},
                  tokenizer_config__json=json.dumps({"chat_template": "{{ '<|user|>' }}"}))
    assert ModelConfig.from_dict(meta["model"]) == dataclasses.replace(PRESETS["chatglm3-6b"], max_seq_len=8192)
    assert meta["tokenizer_specials"]["<|observation|>"] == 64797
    meta = _clone(tmp_path / "g4", GLM4_9B_CHAT,
                  tokenizer_config__json=json.dumps({"added_tokens_decoder": GLM4_DECODER}))
    assert ModelConfig.from_dict(meta["model"]) == PRESETS["glm-4-9b"] and meta["dtype"] == "bf16"
    hf = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": 151552, "hidden_size": 4096,
          "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2,
          "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07,
          "rope_theta": 5000000.0, "partial_rotary_factor": 0.5, "attention_bias": True, "tie_word_embeddings": False,
          "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "torch_dtype": "bfloat16"}
    meta = _clone(tmp_path / "g4hf", hf, tokenizer_config__json=json.dumps({"added_tokens_decoder": GLM4_DECODER}))
    assert ModelConfig.from_dict(meta["model"]) == PRESETS["glm-4-9b"] and meta["tensor_names"] == "glm"


@pytest.mark.parametrize("conf, word", [({**CHATGLM2_6B, "rmsnorm": False}, "rmsnorm=False"),
                                        ({**CHATGLM2_6B, "kv_channels": 64}, "kv_channels 64"),
                                        ({**CHATGLM2_6B, "add_qkv_bias": False}, "add_qkv_bias=False"),
                                        ({"model_type": "glm", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "partial_rotary_factor": 1.0}, "partial_rotary_factor=1.0")])
def test_a_variant_the_model_does_not_compute_is_refused_in_one_line(conf, word, tmp_path):
    with pytest.raises(CheckpointError) as e:
        _clone(tmp_path, conf)
    assert word in str(e.value) and "\n" not in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("key, value, word", [("num_layers", -1, "num_layers -1"), ("seq_length", 0, "max_seq_len 0"),
                                             ("rope_ratio", float("nan"), "rotary_base nan"),
                                             ("layernorm_epsilon", "x", "layernorm_epsilon='x'"),
                                             ("ffn_hidden_size", 1.5, "ffn_hidden_size=1.5"),
                                             ("layernorm_epsilon", float("inf"), "layernorm_eps inf"),
                                             ("num_layers", float("inf"), "num_layers=inf"),
                                             ("num_layers", float("nan"), "num_layers=nan")])
def test_a_value_out_of_bounds_is_one_line_naming_it(key, value, word, tmp_path):
    with pytest.raises(CheckpointError) as e:
        _clone(tmp_path, {**CHATGLM2_6B, key: value})
    assert word in str(e.value) and "\n" not in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("layout, chat, file, kind, first, stops", [
    ("chatglm2", "chatglm2", "tokenizer.model", "sentencepiece", {"[MASK]": 104, "sop": 107, "eop": 108}, ()),
    ("chatglm2", "chatglm3", "tokenizer.model", "sentencepiece", {"eop": 108, "<|system|>": 109, "<|user|>": 110,
                                                                   "<|observation|>": 112}, (110, 112)),
    ("chatglm2", "glm4", "tokenizer.model", "tiktoken", {"<|endoftext|>": 256, "[gMASK]": 258, "<sop>": 260}, (263, 265)),
    ("glm-hf", None, "tokenizer.json", "tokenizers", {"<|endoftext|>": 256, "<|user|>": 263}, (263, 265))])
def test_the_tokenizer_files_give_the_special_ids_and_the_chat_format(layout, chat, file, kind, first, stops, tmp_path):
    ckpt = write_clone(tmp_path / "c", layout, "tiny-chatglm2", *(("--chat", chat) if chat else ()))
    meta = open_source(ckpt).metadata
    assert (meta["tokenizer"], meta["tokenizer_kind"], meta["tokenizer_offset"]) == (file, kind, 0)
    assert first.items() <= meta["tokenizer_specials"].items()
    cfg = ModelConfig.from_dict(meta["model"])
    assert cfg.chat_template == (chat or "glm4") and cfg.stop_ids == stops and cfg.causal
    assert cfg.special.sop == first.get("sop", first.get("<sop>", cfg.special.sop))
    if cfg.chat_template == "glm4":  # GLM-4 ends a text with <|endoftext|> and pads with it
        assert cfg.special.eos == cfg.special.pad == 256 and cfg.special.gmask == 258
    shape = dataclasses.replace(cfg, special=PRESETS["tiny-chatglm2"].special, stop_ids=(), chat_template="")
    assert shape == PRESETS["tiny-chatglm2"]


def test_every_name_maps_back_and_the_rotary_buffers_are_ignored():
    cfg = PRESETS["tiny-chatglm2"]
    for layout in names.LAYOUTS:
        for name in full_shapes(cfg):
            stored = names.theirs(name, layout)
            assert all(names.ours(s, layout) == name for s in stored)
            assert [names.fused_part(s, layout) for s in stored] == ([0, 1, 2] if len(stored) == 3 else [None])
    assert names.theirs("transformer.layers.2.attention.query_key_value.weight", "chatglm2") == \
        ["transformer.encoder.layers.2.self_attention.query_key_value.weight"]
    assert names.theirs("lm_head.weight", "chatglm2") == ["transformer.output_layer.weight"]
    assert names.theirs("transformer.layers.0.mlp.dense_h_to_4h.weight", "glm") == ["model.layers.0.mlp.gate_up_proj.weight"]
    for layout, buffer in (("chatglm2", "transformer.rotary_pos_emb.inv_freq"),
                           ("glm", "model.layers.0.self_attn.rotary_emb.inv_freq")):
        assert is_ignored(names.ours(buffer, layout))


class _Refuses:
    """A stored tensor that must not be read."""
    shape, dtype = (4, 3), torch.float32

    def narrow(self, *args):
        raise AssertionError("read a projection the slice does not cover")


def test_separate_projections_are_one_qkv_that_reads_only_the_rows_asked():
    k, v = torch.arange(6.).reshape(2, 3), torch.arange(6., 12.).reshape(2, 3)
    fused = FusedRows([_Refuses(), k, v])
    assert fused.shape == (8, 3)
    assert torch.equal(fused.narrow(0, 4, 2), k) and torch.equal(fused.narrow(0, 5, 2), torch.stack([k[1], v[0]]))


def test_int4_clone_loads_its_packed_weights_as_they_are_on_each_rank(tmp_path):
    ckpt = write_clone(tmp_path / "q", "chatglm2", "tiny-chatglm2", "--quant", "int4")
    from safetensors.torch import load_file
    stored = load_file(str(ckpt / "model.safetensors"))
    dense = "transformer.encoder.layers.1.self_attention.dense.weight"
    for rank in range(4):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model = load_model(ckpt, tp=simulated_rank(4, rank), progress=False, kernels="dequant")  # quant: as held
        assert not [w for w in seen if "quantized again" in str(w.message)]  # row-parallel slices are exact
        layer = dict(model.named_modules())["transformer.layers.1.attention.dense"]
        cols = stored[dense].shape[1] // 4
        assert model.quant_bits == 4 and torch.equal(layer.weight, stored[dense][:, rank * cols:(rank + 1) * cols])
        assert torch.equal(layer.weight_scale, stored[dense + "_scale"])


def test_a_missing_weight_file_is_one_line_naming_it(tmp_path):
    ckpt = write_clone(tmp_path / "c", "glm-hf", "tiny-chatglm2", "--files", "2")
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt, progress=False)
    assert "model-00002-of-00002.safetensors is missing" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_projection_is_one_line_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file
    ckpt = write_clone(tmp_path / "c", "glm-hf", "tiny-chatglm2")
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt, progress=False)
    assert "lacks model.layers.1.self_attn.k_proj.bias" in str(e.value) and "\n" not in str(e.value)


def _logits(ckpt, **kwargs) -> torch.Tensor:
    model = load_model(ckpt, dtype="fp32", progress=False, **kwargs)
    with torch.inference_mode():
        return model(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 1, 2, 3]]),
                     SeqLayout(torch.tensor([0]), torch.tensor([4])), model.new_cache(1, 8))


@pytest.mark.parametrize("layout, chat, gmask", [("chatglm2", "chatglm2", 1020), ("glm-hf", "glm4", 1012)])
def test_a_clone_of_config_json_and_weights_alone_loads_with_no_preset(layout, chat, gmask, tmp_path):
    ckpt = write_clone(tmp_path / "c", layout, "tiny-chatglm2")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink(missing_ok=True)
    assert read_metadata(ckpt) is None and sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    model = load_model(ckpt, progress=False)
    cfg = model.cfg
    assert cfg.kv_groups == 2 and cfg.causal and cfg.chat_template == chat
    # no tokenizer to say where the specials are: they take the top ids of the vocabulary, in the family's order
    assert cfg.special.gmask == gmask and cfg.special.mask == gmask - 1


@pytest.mark.parametrize("options", [(), ("--quant", "int4")], ids=["fp32", "int4"])
def test_repartition_of_a_chatglm2_clone_gives_the_same_logits(options, tmp_path):
    ckpt = write_clone(tmp_path / "c", "chatglm2", "tiny-chatglm2", "--files", "2", *options)
    out = tmp_path / "tp2"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rewrite(ckpt, out, 2, progress=False)
    assert not [w for w in seen if "quantized again" in str(w.message)]  # exact: no slice is quantized again
    meta = read_metadata(out)
    assert meta["tp"] == 2 and "tensor_names" not in meta and (out / "tokenizer.model").is_file()
    assert ModelConfig.from_dict(meta["model"]) == open_source(ckpt).model_config()
    if not options:
        assert torch.equal(_logits(out), _logits(ckpt))
    for rank in range(2):  # each rank holds the same tensors from the shards as from the clone (INT4: as packed)
        a, b = (dict(load_model(c, tp=simulated_rank(2, rank), progress=False, kernels="dequant").named_parameters())
                for c in (out, ckpt))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    if not options:  # glm-tp-quantize of the float clone: INT4 shards that load as such
        rewrite(ckpt, tmp_path / "int4", 2, bits=4, progress=False)
        model = load_model(tmp_path / "int4", tp=simulated_rank(2, 1), progress=False, kernels="dequant")
        assert model.quant_bits == 4 and model.cfg == open_source(ckpt).model_config()


@pytest.mark.parametrize("naming", ["chatglm2", "glm"])
def test_bin_shards_with_their_rotary_buffer_load_as_the_release_layout(naming, tmp_path):
    """pytorch_model-0000X-of-00003.bin with their index, as the clones ship them; the stored inv_freq is dropped."""
    from glm_tp.checkpoints.hf import write_hf_checkpoint
    from glm_tp.checkpoints.synthetic import random_shard
    from tests.support.checkpoints import write_random_checkpoint
    cfg = PRESETS["tiny-chatglm2"]
    state = random_shard(cfg, 1, 0, 2, torch.float32)
    buffer = "transformer.rotary_pos_emb.inv_freq" if naming == "chatglm2" else "model.layers.0.self_attn.rotary_emb.inv_freq"
    ckpt = write_hf_checkpoint(tmp_path / "c", cfg, {**state, buffer: torch.ones(4)}, files=3, fmt="bin", naming=naming)
    assert (ckpt / "pytorch_model.bin.index.json").is_file() and (ckpt / "pytorch_model-00003-of-00003.bin").is_file()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = _logits(ckpt)
    assert not [w for w in seen if "does not use" in str(w.message)]
    assert torch.equal(got, _logits(write_random_checkpoint(tmp_path / "release", cfg, 1, torch.float32, seed=2)))


@pytest.mark.parametrize("key, value, word", [("num_layers", float("inf"), "infinity"),
                                              ("hidden_size", -64, "hidden_size -64"),
                                              ("layernorm_epsilon", float("nan"), "layernorm_eps nan")])
def test_chatglm_6b_config_values_out_of_bounds_are_one_line_too(key, value, word, tmp_path):
    clone = write_clone(tmp_path / "c6", "hf", "tiny-chatglm")
    conf = json.loads((clone / "config.json").read_text())
    (clone / "config.json").write_text(json.dumps({**conf, key: value}))
    with pytest.raises(CheckpointError) as e:
        config_metadata(clone)
    assert word in str(e.value) and "\n" not in str(e.value) and "config.json" in str(e.value)
