"""glm-tp-repartition (glm_tp/cli/convert.py): exact round trips between TP sizes, streaming memory, quantized input."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from glm_tp import load_model
from glm_tp.checkpoints.release import inspect, open_shard
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.config import PRESETS, ModelConfig
from tests.support import ROOT
from tests.support.checkpoints import identical, shards, write_random_checkpoint


@pytest.mark.parametrize("path", [(1, 4, 1), (8, 2, 8), (2, 8, 1)])
def test_round_trips_are_bit_identical(tmp_path, path):
    cfg = PRESETS["tiny"]
    start = write_random_checkpoint(tmp_path / f"tp{path[0]}", cfg, path[0], torch.float16)
    current = start
    for tp in path[1:]:
        nxt = tmp_path / f"to{tp}-{len(list(tmp_path.iterdir()))}"
        rewrite(current, nxt, tp, progress=False)
        assert inspect(nxt).tp == tp and json.loads((nxt / "glm_tp.json").read_text())["tp"] == tp
        # the result equals a checkpoint cut directly for that TP size
        assert identical(nxt, write_random_checkpoint(tmp_path / f"direct{tp}-{len(path)}", cfg, tp, torch.float16))
        current = nxt
    assert identical(current, start if path[-1] == path[0] else
                      write_random_checkpoint(tmp_path / "direct-end", cfg, path[-1], torch.float16))
    if path[-1] == 1:
        load_model(current, progress=False)  # the loader takes the result


def test_replicated_mismatch_is_named_and_dst_must_be_empty(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", PRESETS["tiny"], 2, torch.float16)
    path = src / "1" / "mp_rank_01_model_states.pt"
    state = {k: v.clone() for k, v in open_shard(path)[0].items()}
    state["transformer.final_layernorm.bias"] += 1
    torch.save({"module": state}, path)
    with pytest.warns(UserWarning, match="final_layernorm.bias differs across source shards"):
        rewrite(src, tmp_path / "dst", 1, progress=False)
    res = subprocess.run([sys.executable, "tools/repartition.py", str(src), str(tmp_path / "dst"), "--tp", "1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "not empty" in res.stderr and "--force" in res.stderr


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_input_is_cut_exactly_and_joined_with_a_lossy_warning(tmp_path, bits):
    src = write_random_checkpoint(tmp_path / "src", PRESETS["tiny"], 1, torch.float16)
    q1 = tmp_path / "q1"
    rewrite(src, q1, 1, bits=bits, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cutting keeps every scale: nothing lossy to warn about
        rewrite(q1, tmp_path / "q2", 2, progress=False)
    direct = tmp_path / "direct"
    rewrite(src, direct, 2, bits=bits, progress=False)
    one, a, b = shards(q1)[0], shards(tmp_path / "q2"), shards(direct)
    for name in a[0]:
        if "query_key_value.weight" in name or "dense_h_to_4h" in name:  # column-parallel: scales travel exactly
            assert all(torch.equal(x[name], y[name]) for x, y in zip(a, b)), name
        if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):  # row-parallel: slices of q1
            assert torch.equal(torch.cat([x[name] for x in a], dim=1), one[name]), name
            assert all(torch.equal(x[name + "_scale"], one[name + "_scale"]) for x in a), name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewrite(direct, tmp_path / "joined", 1, progress=False)  # two sets of row scales into one: re-quantized
    assert any("lossy" in str(w.message) and "dense" in str(w.message) for w in caught)



RSS_SCRIPT = r"""
import json, runpy, sys
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
sys.path.insert(0, sys.argv[1] + "/tools")
import torch, tqdm, glm_tp.checkpoints.reshard  # imports (and torch's lazily loaded meta-tensor code) are the baseline
torch.cat([torch.empty(2, 3, device="meta")] * 2)
before = status("VmRSS")
sys.argv = ["repartition.py", sys.argv[2], sys.argv[3], "--tp", sys.argv[4]]
runpy.run_path(sys.path[0] + "/repartition.py", run_name="__main__")
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_repartition_streams_one_parameter_at_a_time(tmp_path):
    cfg = ModelConfig(num_layers=3, hidden_size=2048, num_heads=16, inner_hidden_size=4096, vocab_size=4096,
                      max_seq_len=256)
    src = write_random_checkpoint(tmp_path / "src", cfg, 2, torch.float16)
    total = sum(p.stat().st_size for p in inspect(src).shards)
    largest = max(t.numel() * t.element_size() for t in shards(src)[0].values()) * 2  # one tensor, both shards
    for tp in ("1", "4"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ROOT), str(src), str(tmp_path / f"to{tp}"), tp],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        grown = r["peak"] - r["before"]
        print(f"2 -> {tp}: checkpoint {total / 1e6:.0f} MB, largest parameter group {largest / 1e6:.1f} MB, "
              f"RSS grew {grown / 1e6:.1f} MB")
        assert grown < 2 * largest
    assert identical(tmp_path / "to1", write_random_checkpoint(tmp_path / "direct", cfg, 1, torch.float16))


def test_the_lossy_warning_of_the_command_is_one_plain_line(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", PRESETS["tiny"], 2, torch.float16)
    rewrite(src, tmp_path / "q", 2, bits=8, progress=False)
    res = subprocess.run([sys.executable, "tools/repartition.py", str(tmp_path / "q"), str(tmp_path / "one"), "--tp", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    said = [line for line in res.stderr.replace("\r", "\n").splitlines() if "lossy" in line]
    assert len(said) == 1 and said[0].startswith("warning: 4 quantized weights were dequantized"), res.stderr
    assert "warnings.warn" not in res.stderr and "UserWarning" not in res.stderr and ".py:" not in res.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_checkpoint_made_float_again_loads_in_the_sources_float_dtype(tmp_path, dtype):
    src = write_random_checkpoint(tmp_path / "src", PRESETS["tiny"], 1, dtype)
    rewrite(src, tmp_path / "q", 1, bits=4, progress=False)
    rewrite(tmp_path / "q", tmp_path / "f", 2, bits=0, progress=False)
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    assert {s[qkv].dtype for s in shards(tmp_path / "f")} == {dtype}
    model = load_model(tmp_path / "f", model="tiny")  # the weights and the metadata agree
    assert next(model.parameters()).dtype in (dtype, torch.float32)
