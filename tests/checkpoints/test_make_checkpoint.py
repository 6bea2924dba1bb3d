"""tools/make_checkpoint.py writes synthetic.random_shard's tensors, drawing each full tensor once whatever
--tp is (GLM-130B-sized shapes took 8 draws per tensor at --tp 8), and shows its progress; its Hugging Face
layout is the same model, read by the loaders as a clone is."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from glm_tp.checkpoints.release import inspect, open_shard
from glm_tp.checkpoints.sources import open_source
from glm_tp.checkpoints.synthetic import BLOCK, random_shard, random_tensor
from glm_tp.cli import make_checkpoint
from glm_tp.cli.generate import load_engine, tokenizer_file
from glm_tp.cli.settings import CONFIG_DIR
from glm_tp.config import PRESETS
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.model.glm import SeqLayout
from glm_tp.parallel.dist import init_distributed
from glm_tp.parallel.partition import full_shapes
from tests.support import ROOT


# tiny-chatglm has a GeLU MLP: its h->4h is cut as a plain column layer, not as GLU halves
@pytest.mark.parametrize("preset, tp", [("tiny", 1), ("tiny", 4), ("tiny-chatglm", 4)])
def test_shards_are_random_shard_and_each_tensor_is_drawn_once(preset, tp, tmp_path, monkeypatch):
    drawn: list[str] = []

    def counting(name, *args, **kwargs):
        drawn.append(name)
        return random_tensor(name, *args, **kwargs)

    monkeypatch.setattr(make_checkpoint, "random_tensor", counting)
    make_checkpoint.main([str(tmp_path / "ckpt"), "--preset", preset, "--tp", str(tp), "--seed", "5"])
    assert sorted(drawn) == sorted(full_shapes(PRESETS[preset]))  # once each, not once per rank
    info = inspect(tmp_path / "ckpt")
    assert info.tp == tp and info.model_config() == PRESETS[preset]
    for rank, path in enumerate(info.shards):
        state, _ = open_shard(path)
        expected = random_shard(PRESETS[preset], tp, rank, 5, torch.float16)
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_large_tensor_is_drawn_in_blocks_that_continue_one_stream():
    per_block = BLOCK // 1024
    t = random_tensor("transformer.layers.0.mlp.dense_4h_to_h.weight", (3 * per_block + 5, 1024), 0, 64,
                      torch.float16)
    assert t.dtype == torch.float16 and abs(float(t.float().std()) * 1024 ** 0.5 - 1) < 0.01
    assert not torch.equal(t[:8], t[per_block:per_block + 8])  # a block does not restart the stream


def test_progress_is_shown(tmp_path):
    done = subprocess.run([sys.executable, "tools/make_checkpoint.py", str(tmp_path / "c"), "--preset", "tiny",
                           "--tp", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "writing shards" in done.stderr and "100%" in done.stderr


def _generated(ckpt) -> tuple[list[tuple[str, list[int]]], torch.Tensor]:
    """Answers (text, ids) to a text prompt and an ids prompt, and a forward pass's logits, through glm-tp-generate's
    own loading (the checkpoint's model, its tokenizer)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("generate", overrides=[f"checkpoint={ckpt}", "dtype=fp32"])
    gen = GenerationConfig(max_new_tokens=6)
    engine = load_engine(cfg, init_distributed("cpu"), gen, tokenizer_file(cfg, gen))
    s = engine.model.cfg.special
    results = engine.generate([Request("text", text="monday tuesday [MASK]"), Request("ids", token_ids=[5, 6, s.gmask])])
    with torch.inference_mode():
        positions = torch.stack([torch.arange(4), torch.zeros(4, dtype=torch.long)], dim=-1)[None]  # 2D
        logits = engine.model(torch.tensor([[5, 6, 7, 8]]), positions,
                              SeqLayout(torch.tensor([0]), torch.tensor([4])), None)
    return [(r.text, r.token_ids) for r in results], logits


def test_the_hugging_face_layout_generates_as_the_release_layout_of_the_same_seed(tmp_path):
    release, hf, single = tmp_path / "release", tmp_path / "hf", tmp_path / "single"
    make_checkpoint.main([str(release), "--preset", "tiny-chatglm", "--seed", "3"])
    make_checkpoint.main([str(hf), "--preset", "tiny-chatglm", "--layout", "hf", "--files", "2", "--seed", "3"])
    make_checkpoint.main([str(single), "--preset", "tiny-chatglm", "--layout", "hf", "--seed", "3"])
    assert {p.name for p in hf.iterdir()} == {"config.json", "tokenizer_config.json", "ice_text.model",
                                              "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors"}
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    assert open_source(hf).layout_name == "Hugging Face, 2 file(s)"
    assert open_source(hf).model_config() == PRESETS["tiny-chatglm"]
    want, want_logits = _generated(release)
    assert want[0][0] and want[0][1] and want[1][1]  # text came back: the checkpoint brought its tokenizer
    for ckpt in (hf, single):
        got, logits = _generated(ckpt)
        assert got == want and torch.equal(logits, want_logits), ckpt.name


@pytest.mark.parametrize("args, says", [
    (["--preset", "tiny", "--layout", "hf"], "the Hugging Face layout is ChatGLM-6B's"),
    (["--preset", "tiny-chatglm", "--layout", "hf", "--tp", "2"], "holds whole tensors"),
    (["--preset", "tiny", "--files", "2"], "--files is for --layout hf"),
    (["--preset", "tiny-chatglm", "--layout", "chatglm2"], "--layout chatglm2 holds the ChatGLM2/3 and GLM-4 architecture"),
    (["--preset", "tiny-chatglm2", "--layout", "glm-hf", "--quant", "int4"], "--quant is for --layout hf and chatglm2"),
    (["--preset", "tiny-chatglm2", "--layout", "glm-hf", "--chat", "chatglm3"], "--chat is for --layout chatglm2"),
    (["--preset", "tiny-chatglm2", "--quant", "int4"], "--quant and --chat are for the Hugging Face layouts"),
])
def test_a_layout_that_cannot_hold_the_model_is_refused(args, says, tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_checkpoint.main([str(tmp_path / "c"), *args])
    assert says in capsys.readouterr().err and not (tmp_path / "c").exists()
