"""tools/make_checkpoint.py writes synthetic.random_shard's tensors, drawing each full tensor once whatever
--tp is (GLM-130B-sized shapes took 8 draws per tensor at --tp 8), and shows its progress."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from glm_tp.checkpoints.release import inspect, open_shard
from glm_tp.checkpoints.synthetic import BLOCK, random_shard, random_tensor
from glm_tp.cli import make_checkpoint
from glm_tp.config import PRESETS
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
