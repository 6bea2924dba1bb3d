"""Loading release-format shards: every way a checkpoint can be wrong gives a one-line fix."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm_tp import CheckpointError, load_model
from glm_tp.checkpoints.release import METADATA_FILE, inspect, open_shard, write_latest
from glm_tp.config import PRESETS, ModelConfig
from tests.support import ROOT
from tests.support.checkpoints import load_rss, write_random_checkpoint


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rerecord(ckpt: Path) -> None:
    """A test edited a shard on purpose: record its new size and checksum."""
    meta = json.loads((ckpt / METADATA_FILE).read_text())
    write_latest(ckpt, "1", {k: v for k, v in meta.items() if k != "files"})


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_release_checkpoint_without_metadata_loads_with_a_preset(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints[1], tmp_path / "release")
    (ckpt / METADATA_FILE).unlink()
    (ckpt / "latest").write_text("release")
    (ckpt / "1").rename(ckpt / "release")
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, progress=False)
    assert "pass model=" in _one_line(err)
    model = load_model(ckpt, model="tiny", progress=False)
    assert model.cfg == PRESETS["tiny"]


def test_ignores_rotary_inv_freq(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints[1], tmp_path / "ck")
    shard = ckpt / "1" / "mp_rank_00_model_states.pt"
    state, _ = open_shard(shard)
    state = {k: v.clone() for k, v in state.items()}
    state["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save({"module": state}, shard)
    _rerecord(ckpt)
    load_model(ckpt, progress=False)


def test_missing_latest_and_missing_shard(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints[2], tmp_path / "ck")
    (ckpt / "latest").unlink()
    with pytest.raises(CheckpointError) as err:
        inspect(ckpt)
    assert "latest" in _one_line(err) and "is missing" in str(err.value)
    (ckpt / "latest").write_text("1\n")
    (ckpt / "1" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        inspect(ckpt)
    assert "mp_rank_00_model_states.pt" in _one_line(err)
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect(tmp_path / "nowhere")


def test_any_shard_count_loads_on_one_rank(tiny_checkpoints):
    # one process, two or four shards: each tensor is put together from the shards' slices
    want = dict(load_model(tiny_checkpoints[1], progress=False).named_parameters())
    for tp in (2, 4):
        got = dict(load_model(tiny_checkpoints[tp], progress=False).named_parameters())
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_wrong_shape_names_tensor_and_cause(tiny_checkpoints, tmp_path):
    wide = ModelConfig(num_layers=2, hidden_size=96, num_heads=8, inner_hidden_size=128, vocab_size=1024,
                       max_seq_len=128)
    with pytest.raises(CheckpointError) as err:
        load_model(tiny_checkpoints[1], model=wide, progress=False)
    msg = _one_line(err)
    assert "transformer.word_embeddings.weight" in msg and "[1024, 64]" in msg and "[1024, 96]" in msg
    assert "preset" in msg


def test_wrong_tp_cut_is_recognised(tiny_checkpoints, tmp_path):
    # a TP=2 shard renamed into a one-shard checkpoint: every split tensor is half the expected size
    ckpt = tmp_path / "ck"
    (ckpt / "1").mkdir(parents=True)
    shutil.copy(tiny_checkpoints[2] / "1" / "mp_rank_00_model_states.pt", ckpt / "1")
    (ckpt / "latest").write_text("1")
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, model="tiny", progress=False)
    assert "hold 1/2 of each tensor" in _one_line(err) and "restore the missing shards" in str(err.value)


def test_missing_keys_and_truncated_file(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints[1], tmp_path / "ck")
    shard = ckpt / "1" / "mp_rank_00_model_states.pt"
    state, _ = open_shard(shard)
    state = {k: v.clone() for k, v in state.items() if "layers.1.mlp" not in k}
    torch.save({"module": state}, shard)
    _rerecord(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, progress=False)
    assert "lacks 4 tensor(s)" in _one_line(err) and "layers.1.mlp" in str(err.value)

    data = (tiny_checkpoints[1] / "1" / "mp_rank_00_model_states.pt").read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _rerecord(ckpt)  # recorded as it is now: the file itself shows it is cut
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, progress=False)
    assert "truncated or corrupt" in _one_line(err)


def test_bad_metadata_and_bad_tp_size(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints[1], tmp_path / "ck")
    (ckpt / METADATA_FILE).write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        inspect(ckpt)
    assert "not valid JSON" in _one_line(err)
    with pytest.raises(ValueError) as err:
        PRESETS["glm-130b"].check_tp(3)
    assert "valid sizes: 1, 2, 4, 8, 16, 32" in _one_line(err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_stays_near_what_the_rank_keeps(tmp_path):
    # ~200 MB of fp16 weights: loading into fp16 maps the file (zero copy); into fp32 it copies
    # tensor by tensor and drops each mapped page after use
    cfg = ModelConfig(num_layers=6, hidden_size=1024, num_heads=8, inner_hidden_size=2560, vocab_size=4096,
                      max_seq_len=256)
    ckpt = write_random_checkpoint(tmp_path / "big", cfg, 1, torch.float16)
    shard_bytes = (ckpt / "1" / "mp_rank_00_model_states.pt").stat().st_size
    assert shard_bytes > 150e6
    for dtype in ("fp16", "fp32"):
        r = load_rss(ckpt, dtype, forward=True)
        grown = r["peak"] - r["before"]
        print(f"{dtype}: shard {shard_bytes / 1e6:.0f} MB, kept {r['kept'] / 1e6:.0f} MB, "
              f"RSS grew {grown / 1e6:.0f} MB ({grown / r['kept']:.2f}x kept)")
        assert grown < 1.3 * r["kept"]


def _torchrun_output(ckpt: Path, nproc: int) -> str:
    script = (
        "import torch, glm_tp;"
        "m = glm_tp.load_model(%r, progress=False);"
        "t = torch.tensor([[5, 6, 7, 1001, 1004]]);"
        "out = m(t, torch.arange(5)[None], glm_tp.SeqLayout(torch.tensor([0]), torch.tensor([4])), m.new_cache(1, 8));"
        "print(f'LOGITS {None if out is None else round(float(out.double().sum()), 3)}')" % str(ckpt)
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--no-python",
           sys.executable, "-c", script]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_under_torchrun(tiny_checkpoints):
    outs = {n: _torchrun_output(tiny_checkpoints[n], n) for n in (1, 2, 4)}
    # ranks print concurrently, so their lines may interleave: find the values anywhere in the output
    values = [v for n in outs for v in re.findall(r"LOGITS (None|-?[\d.]+)", outs[n])]
    assert values.count("None") == 1 + 3  # ranks > 0 get no logits
    sums = [float(v) for v in values if v != "None"]
    assert len(sums) == 3 and max(sums) - min(sums) < 1e-2, outs
