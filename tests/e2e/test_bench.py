"""tools/bench.py runs end to end, its timing helpers call each contender in turn, and a signal ends it with the
rows it has measured."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from glm_tp.kernels import native

from tests.support import ROOT


def test_bench_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for launcher, extra in (([sys.executable], []), ([sys.executable], ["--simulate-tp", "4", "--quant", "int8", "--kernels", "q8", "--lm-head", "int8"]),
                            (torchrun, [])):
        res = subprocess.run([*launcher, "tools/bench.py", "--preset", "tiny", "--prefill", "16", "--batches", "1,2",
                              "--steps", "2", "--runs", "2", "--json", str(out), *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "decode batch 2" in res.stderr  # progress while it measures
        r = json.loads(out.read_text())
        assert r["decode_ms_per_step"]["1"]["median"] > 0 and r["read_bandwidth_gbs"] > 0
        assert r["matmul_peak_tflops"] > 0 and r["prefill_mfu"]["16"] > 0
        assert 0 < r["decode_efficiency"]["1"] and r["decode_ceiling_ms"]["2"] >= r["decode_ceiling_ms"]["1"]
        if "--simulate-tp" in extra:
            assert "single-rank simulation" in r["label"] and "single-rank simulation" in res.stdout
            assert r["kernels"] == "q8" and r["lm_head"] == "int8" and "kernels q8, LM head int8" in res.stdout
        assert (r["allreduce_ms_per_step"] is None) == (launcher != torchrun)  # measured only with real ranks


def test_bench_runs_the_chatglm2_architecture_through_the_new_kernels(tmp_path):
    # the chatglm2-6b preset's architecture (2 KV groups, pair rotary, SwiGLU, untied head) at a small width,
    # 2 of its 28 layers; INT8, so that the GEMVs (and the SwiGLU fused into them) take every linear
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "tools/bench.py", "--preset", "chatglm2-6b", "--layers", "2", "--hidden", "256",
                          "--heads", "8", "--inner", "512", "--vocab", "1024", "--max-len", "256", "--quant", "int8",
                          "--prefill", "16", "--batches", "1,2", "--steps", "2", "--runs", "1", "--compare-decode-ops",
                          "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    attention = "native" if native.available() and native.best_isa() != "scalar" else "numba"  # attention.decode_kernel
    assert r["kernel_paths"]["attention"] == f"{attention} decode kernel"
    assert r["kernel_paths"]["mlp_activation"] == "swiglu fused into the h->4h GEMV"
    # the default kernels: the native GEMV where it is built, else numba's
    assert r["kernel_paths"]["mlp_h_to_4h"].startswith("native GEMV" if native.available() else "numba GEMV")
    # bytes counted on the model: per layer the int8 values of QKV (8 query and 2 KV heads of 32 rows), dense,
    # h->4h (gate and up), 4h->h; an fp16 scale per output row; the bf16 QKV bias and two RMSNorm gains
    h, f, qkv = 256, 512, (8 + 2 * 2) * 32
    int8_layer = (qkv + h + 2 * f) * h + h * f + 2 * (qkv + h + 2 * f + h) + 2 * qkv + 2 * 2 * h
    head = 1024 * h * 2  # the bf16 LM head; the untied embedding table is read one row a step
    assert r["read_bytes_per_step"] == 2 * int8_layer + head + 2 * h
    assert r["full_depth"]["layers"] == 28 and r["full_depth"]["read_bytes_per_step"] == 28 * int8_layer + head + 2 * h
    assert r["full_depth"]["ms_per_step_at_this_rate"] > r["decode_ms_per_step"]["1"]["median"]
    assert "at full depth (28 layers)" in res.stdout and f"decode kernels: attention {attention} decode kernel" in res.stdout
    ops = r["decode_ops"]  # the same model with and without the new kernels, in turn
    assert ops["kernels_ms"] > 0 and ops["torch_ops_ms"] > 0 and len(ops["speedup_per_round"]) == 1
    assert "with torch's ops in their place" in res.stdout


def test_alternated_timing_calls_each_in_turn():
    import torch
    sys.path.insert(0, str(ROOT / "tools"))
    import bench

    order: list[str] = []
    ours = (lambda: order.append("ours"), lambda: order.append("rewind"))
    theirs = (lambda: order.append("theirs"), None)
    a, b = bench.alternated([ours, theirs], torch.device("cpu"), 2)
    assert order == ["rewind", "ours", "theirs"] * 3  # one warm-up round, then two timed rounds
    assert len(a) == len(b) == 2 and min(a + b) >= 0


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_prints_the_rows_measured_so_far_and_fails(signum, code):
    """A long run says up front what it does and how long it takes at least, reports each row, and a signal ends
    it with the table of the rows it has (and a non-zero exit)."""
    bench = subprocess.Popen([sys.executable, "tools/bench.py", "--preset", "tiny", "--prefill", "16",
                              "--batches", "1", "--steps", "100", "--context", "16", "--runs", "1000"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in bench.stderr:  # wait for the first row's result, then signal during the second row
            seen.append(line)
            if "decode batch 1 (" in line:
                break
        bench.send_signal(signum)
        out, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
    head = "".join(seen)
    assert "glm-tp bench: 1 prefill and 1 decode rows" in seen[0] and "take at least" in head
    assert "row 1/2: prefill 16 tokens" in head and "  prefill 16 tokens: " in head and "row 2/2: decode" in head
    assert bench.returncode == code, err[-2000:]
    assert "glm-tp bench: TP=1" in out and "prefill    16 tokens:" in out and "decode batch" not in out
    assert f"stopped by {signal.Signals(signum).name} after 1 of 2 rows" in out and "Traceback" not in err
