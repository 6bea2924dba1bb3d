"""The ChatGLM-6B family: 2D positions, GeLU MLP, untied LM head, its Hugging Face layout (.bin and
.safetensors shards, INT4), its chat format and tokenizer, at TP 1, 2 and 4 (small random shapes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm_tp import CheckpointError, load_model
from glm_tp.checkpoints.hf import config_metadata, hf_config, write_hf_checkpoint
from glm_tp.checkpoints.synthetic import random_tensor
from glm_tp.config import PRESETS
from glm_tp.kernels.formats import quantize_rows
from glm_tp.model.glm import SeqLayout
from glm_tp.parallel.partition import full_shapes
from glm_tp.text.blanks import next_blank
from glm_tp.text.chat import chat_ids, chat_prompt
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import greedy_blank, run_ranks

CFG = PRESETS["tiny-chatglm"]
S = CFG.special
PROMPTS = ([5, 6, S.mask, 8, 9, S.eos], [11, 12, 13, 14, 15, S.gmask])
STEPS = 5


def full_state(dtype=torch.float32, bits: int = 0) -> dict[str, torch.Tensor]:
    """The tiny ChatGLM's full tensors in the HF naming (= ours); bits: the four linears quantized as
    chatglm-6b-int4 stores them (int8 `weight`, INT4 packed two per byte, and an fp16 `weight_scale`)."""
    state = {n: random_tensor(n, s, 0, CFG.hidden_size).to(dtype) for n, s in full_shapes(CFG).items()}
    state["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4, dtype=dtype)  # HF keeps it; ignored
    if bits:
        for name in [n for n in state if n.endswith(("query_key_value.weight", "dense.weight", "4h.weight", "4h_to_h.weight"))]:
            state[name], state[name + "_scale"] = quantize_rows(state[name], bits)
    return state


def test_2d_blank_positions():
    gmask = next_blank(PROMPTS[1], S.gmask, S, "2d")
    assert gmask.positions == [(i, 0) for i in range(6)] + [(5, 1)] and gmask.tokens[-1] == S.sop
    assert gmask.next_position == (5, 2) and gmask.position_after(3) == (5, 5)
    mask = next_blank(PROMPTS[0], S.mask, S, "2d")
    assert mask.positions[-1] == (2, 1) and mask.position_after(0) == (2, 2) and mask.bidirectional == 6
    one_d = next_blank(PROMPTS[1], S.gmask, S)  # GLM-130B's 1D layout is unchanged
    assert one_d.positions[-1] == 6 and one_d.next_position == 7 and one_d.counting == 1


def _greedy(tp, ckpt, quant=None, kernels="fused"):
    """Greedy answers (rank 0 picks, all follow) and the prefill logits, through the decode path; the last
    step is checked against a full forward over the same 2D positions."""
    model = load_model(ckpt, tp=tp, quant=quant, kernels=kernels, dtype="fp32", progress=False)
    out = []
    with torch.inference_mode():
        for ids in PROMPTS:
            blank = next_blank(ids, S.mask if S.mask in ids else S.gmask, S, "2d")
            layout = SeqLayout(torch.tensor([0]), torch.tensor([blank.bidirectional]))
            answer, seen, logits = greedy_blank(model, blank, STEPS, position_dims=2)
            positions = blank.positions + [blank.position_after(g) for g in range(STEPS)]
            full = model(torch.tensor([blank.tokens + answer]), torch.tensor([positions]), layout, None)
            if full is not None:
                assert (full[0] - logits[0]).abs().max() < 1e-4, "decode step differs from a full forward"
            out.append((answer, seen[0] if seen else None))
    return out if model.tp.is_first else None


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("chatglm") / "release", CFG, 1, torch.float32)


def test_hf_layouts_load_at_tp_1_2_4_as_the_same_weights(release, tmp_path):
    bins = write_hf_checkpoint(tmp_path / "bin", CFG, full_state(), files=3)
    safe = write_hf_checkpoint(tmp_path / "safe", CFG, full_state(), files=2, fmt="safetensors")
    assert (bins / "pytorch_model.bin.index.json").is_file() and (safe / "model-00002-of-00002.safetensors").is_file()
    want = run_ranks(1, _greedy, release)[0]
    for ckpt in (bins, safe):
        for tp in (1, 2, 4):
            got = run_ranks(tp, _greedy, ckpt)[0]
            for (a, la), (b, lb) in zip(got, want):
                print(f"{ckpt.name} TP={tp}: {a} (release layout TP=1: {b})")
                assert a == b and (la - lb).abs().max() < 1e-4


def test_chatglm_int4_layout_loads_quantized(release, tmp_path):
    int4 = write_hf_checkpoint(tmp_path / "int4", CFG, full_state(torch.float16, bits=4), quant_bits=4)
    model = load_model(int4, progress=False)
    assert model.quant_bits == 4
    quantized_here = load_model(write_random_checkpoint(tmp_path / "fp16", CFG, 1, torch.float16), quant="int4",
                                progress=False)
    mine = dict(model.named_parameters())
    for name, p in quantized_here.named_parameters():  # the same row-wise INT4 scheme, bit for bit
        assert torch.equal(mine[name], p), name
    at1, at2 = run_ranks(1, _greedy, int4, None, "dequant")[0], run_ranks(2, _greedy, int4, None, "dequant")[0]
    for (a, la), (b, lb) in zip(at1, at2):
        assert a == b and (la - lb).abs().max() < 1e-4


def test_hf_problems_are_one_line_and_name_the_file(tmp_path):
    ckpt = write_hf_checkpoint(tmp_path / "hf", CFG, full_state(), files=2)
    (ckpt / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002.bin is missing \(pytorch_model.bin.index.json"
                                              r" names it\): copy it into .* \(glm-tp never downloads\)"):
        load_model(ckpt, progress=False)
    conf = json.loads((ckpt / "config.json").read_text())
    del conf["gmask_token_id"]
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="config.json lacks 'gmask_token_id'"):
        load_model(ckpt, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(hf_config(CFG)))
    with pytest.raises(CheckpointError, match="has config.json but no weights"):
        load_model(empty, progress=False)


def test_config_json_reads_into_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(PRESETS["chatglm-6b"])))
    meta = config_metadata(tmp_path)
    assert meta["model"] == PRESETS["chatglm-6b"].to_dict() and meta["tokenizer_offset"] == 0


def test_chat_format():
    one = [{"role": "user", "content": "你好"}]
    assert chat_prompt(one, "chatglm") == "你好"
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
             {"role": "user", "content": "今天呢"}]
    assert chat_prompt(turns, "chatglm") == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：今天呢\n答："
    with pytest.raises(ValueError, match="end with a user message"):
        chat_prompt(turns[:2], "chatglm")
    with pytest.raises(ValueError, match="no chat format"):
        chat_prompt(one, "")


def test_whitespace_pieces_and_chat_ids(tmp_path):
    import sentencepiece as spm

    from glm_tp.text.tokenizer import load_tokenizer
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(["glm fills blanks", "问 答 round", "tensor parallel ranks"] * 30) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "ice_text"), vocab_size=200,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2,
                                   user_defined_symbols=["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)])
    tok = load_tokenizer(tmp_path / "ice_text.model", S, text_offset=0, whitespace=True)
    blank4 = tok.sp.piece_to_id("<|blank_4|>")
    ids = tok.encode("glm    fills\tblanks")
    assert blank4 in ids and tok.sp.piece_to_id("<|tab|>") in ids
    assert tok.decode(ids) == "glm    fills\tblanks"
    ids = chat_ids([{"role": "user", "content": "glm [MASK] fills"}], tok, "chatglm")
    assert ids[-1] == S.gmask and S.mask not in ids  # a typed [MASK] is text, the answer is the [gMASK] blank


def _engine_answers(tp, ckpt, tokenizer_file):
    from glm_tp.engine.types import GenerationConfig, Request
    from tests.support.engines import engine_for
    engine = engine_for(ckpt, tokenizer_file, tp=tp, dtype="fp32", default=GenerationConfig(max_new_tokens=STEPS),
                        max_batch=4)
    requests = [Request(f"r{i}", token_ids=ids) for i, ids in enumerate(PROMPTS)]
    requests.append(Request("beam", token_ids=PROMPTS[1], config=GenerationConfig(strategy="beam", num_beams=2,
                                                                                   max_new_tokens=STEPS)))
    together = [r.blanks_token_ids for r in engine.generate(requests)]
    alone = [engine.generate([r])[0].blanks_token_ids for r in requests]
    return together, alone


def test_the_engine_fills_2d_blanks_alike_at_tp_1_and_2(tmp_path, tiny_tokenizer_file):
    ckpt = write_hf_checkpoint(tmp_path / "hf", CFG, full_state(), files=2)
    together, alone = run_ranks(1, _engine_answers, ckpt, tiny_tokenizer_file)[0]
    assert together == alone and all(len(b) == 1 and b[0] for b in together)
    assert run_ranks(2, _engine_answers, ckpt, tiny_tokenizer_file)[0] == (together, alone)


def test_chat_requests_use_the_models_chat_format(tiny_tokenizer_file):
    """An OpenAI chat body (server and batch runner alike) becomes the model's chat prompt when it has a chat
    format, and joined message texts when it has none (GLM-130B)."""
    from glm_tp.engine.types import GenerationConfig
    from glm_tp.frontends.openai_format import parse_body
    from glm_tp.text.chat import chat_format
    from glm_tp.text.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_tokenizer_file, S)
    messages = [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
                {"role": "user", "content": [{"type": "text", "text": "four [MASK]"}]}]
    body = {"messages": messages, "n": 2}
    parsed = parse_body("chat", body, GenerationConfig(), "c", chat_format("chatglm", tok))
    as_text = [{**m, "content": "four [MASK]"} if i == 2 else m for i, m in enumerate(messages)]
    assert [r.token_ids for r in parsed.requests] == [chat_ids(as_text, tok, "chatglm")] * 2
    assert parsed.requests[0].text is None and parsed.infill == [False]
    plain = parse_body("chat", body, GenerationConfig(), "c", chat_format("", tok))
    assert plain.requests[0].text == "one two\nthree\nfour [MASK]" and plain.infill == [True]
