"""glm-tp-repartition / glm-tp-quantize read every layout the loader reads (a Hugging Face folder, one
unsharded file, release shards at any count) and write release shards at any TP size the model divides
into, with quantized row-parallel scales kept exactly where a slice lies in one source shard."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch

from glm_tp import SeqLayout, load_model
from glm_tp.checkpoints.hf import write_hf_checkpoint
from glm_tp.checkpoints.release import inspect
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.checkpoints.synthetic import random_shard
from glm_tp.config import PRESETS, ModelConfig
from glm_tp.parallel.dist import simulated_rank
from glm_tp.text.blanks import next_blank
from tests.model.test_chatglm import full_state
from tests.support import ROOT
from tests.support.checkpoints import identical, shards, write_random_checkpoint

# the tiny preset with 12 heads: it divides into 3 and 4 ranks (and 2, 6), so 4 -> 3 -> 2 is possible
TWELVE = dataclasses.replace(PRESETS["tiny"], hidden_size=96, num_heads=12, inner_hidden_size=192, vocab_size=1200)
ROW_WEIGHTS = ("attention.dense.weight", "dense_4h_to_h.weight")


def _logits(ckpt, model: str | None = None) -> torch.Tensor:
    """The logits of one blank's fill pass, the model loaded at TP=1 in fp32."""
    net = load_model(ckpt, model=model, dtype="fp32", progress=False)
    s = net.cfg.special
    blank = next_blank([5, 6, 7, s.mask, 8, 9], s.mask, s, net.cfg.position_encoding)
    with torch.inference_mode():
        return net(torch.tensor([blank.tokens]), torch.tensor([blank.positions]),
                   SeqLayout(torch.tensor([0]), torch.tensor([blank.bidirectional])), None)


@pytest.mark.parametrize("fmt,files", [("bin", 3), ("safetensors", 2)])
def test_a_hugging_face_folder_repartitions_to_release_shards(tmp_path, fmt, files):
    cfg = PRESETS["tiny-chatglm"]
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, full_state(), files=files, fmt=fmt)
    out = tmp_path / "tp2"
    rewrite(hf, out, 2, progress=False)
    meta = json.loads((out / "glm_tp.json").read_text())
    assert meta["format"] == "glm-130b-release" and meta["tp"] == 2 and \
        ModelConfig.from_dict(meta["model"]) == cfg
    # the same tensors as the model cut directly for 2 ranks (HF names are ours; rotary_emb.inv_freq is dropped)
    assert identical(out, write_random_checkpoint(tmp_path / "direct", cfg, 2, torch.float32))
    assert torch.equal(_logits(out), _logits(hf))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_single_unsharded_file_repartitions_to_release_shards(tmp_path, suffix):
    full = random_shard(PRESETS["tiny"], 1, 0, 0, torch.float32)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(full, str(path))
    else:
        torch.save(full, path)
    out = tmp_path / "tp4"
    rewrite(path, out, 4, model=PRESETS["tiny"], progress=False)
    assert identical(out, write_random_checkpoint(tmp_path / "direct", PRESETS["tiny"], 4, torch.float32))
    assert torch.equal(_logits(out), _logits(path, model="tiny"))


def test_four_to_three_to_two_shards_and_back_is_bit_identical(tmp_path):
    four = write_random_checkpoint(tmp_path / "tp4", TWELVE, 4, torch.float32)
    current = four
    for tp in (3, 2, 4):  # 4 -> 3 and 3 -> 2: neither count divides the other
        nxt = tmp_path / f"to{tp}"
        rewrite(current, nxt, tp, progress=False)
        assert inspect(nxt).tp == tp
        assert identical(nxt, write_random_checkpoint(tmp_path / f"direct{tp}", TWELVE, tp, torch.float32))
        if tp == 3:
            assert torch.equal(_logits(nxt), _logits(four))
        current = nxt
    assert identical(current, four)


def test_a_quantized_hugging_face_folder_cut_into_shards_keeps_every_scale(tmp_path):
    cfg = PRESETS["tiny-chatglm"]
    hf = write_hf_checkpoint(tmp_path / "hf", cfg, full_state(torch.float16), files=2)
    q1 = tmp_path / "q1"
    res = subprocess.run([sys.executable, "tools/quantize.py", str(hf), str(q1), "--bits", "4"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row-parallel slice lies in the one source shard: nothing lossy
        rewrite(q1, tmp_path / "q2", 2, progress=False)
    one, two = shards(q1)[0], shards(tmp_path / "q2")
    for name in (n for n in one if n.endswith(ROW_WEIGHTS)):
        assert torch.equal(torch.cat([s[name] for s in two], dim=1), one[name]), name
        assert all(torch.equal(s[name + "_scale"], one[name + "_scale"]) for s in two), name


@pytest.mark.parametrize("bits", [8, 4])
def test_two_to_three_quantized_shards_keep_the_scales_of_slices_within_one_shard(tmp_path, bits):
    fp16 = write_random_checkpoint(tmp_path / "fp16", TWELVE, 1, torch.float16)
    q2, q3 = tmp_path / "q2", tmp_path / "q3"
    rewrite(fp16, q2, 2, bits=bits, progress=False)
    with pytest.warns(UserWarning, match="lossy"):  # rank 1's row-parallel slices join both source shards
        report = rewrite(q2, q3, 3, progress=False)
    assert report.lossy and all(n.endswith(ROW_WEIGHTS) for n in report.lossy)
    src, out = shards(q2), shards(q3)
    for name in (n for n in src[0] if n.endswith(ROW_WEIGHTS)):
        cols = src[0][name].shape[1] * 2 // 3  # rank 0 takes the first 2/3 of shard 0; rank 2 the last 2/3 of shard 1
        assert torch.equal(out[0][name], src[0][name][:, :cols]) and torch.equal(out[2][name], src[1][name][:, -cols:])
        assert torch.equal(out[0][name + "_scale"], src[0][name + "_scale"]), name
        assert torch.equal(out[2][name + "_scale"], src[1][name + "_scale"]), name
    # the loader cuts (and, for rank 1, quantizes again) the same slices when it loads the 2 shards on 3 ranks
    for rank in range(3):
        state = load_model(q2, tp=simulated_rank(3, rank), progress=False).state_dict()
        assert state.keys() >= out[rank].keys()
        assert all(torch.equal(state[name], t) for name, t in out[rank].items()), rank
