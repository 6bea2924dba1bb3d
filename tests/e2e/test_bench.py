"""tools/bench.py runs end to end, and the fast decode path gives the plain path's tokens."""
from __future__ import annotations

import json
import subprocess
import sys

from glm_tp import load_model
from glm_tp.engine.core import Engine
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.text.tokenizer import load_tokenizer
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


def test_fused_kernels_give_the_plain_path_tokens(tiny_checkpoints, tiny_tokenizer_file):
    prompts = [Request(str(i), p) for i, p in enumerate(["the quick [MASK] fox", "one two three [gMASK]"])]
    for bits in (8, 4):
        model = load_model(tiny_checkpoints[1], quant=f"int{bits}", progress=False)
        kinds = {m.prepared.kind for m in model.modules() if getattr(m, "prepared", None) is not None}
        assert kinds == {"int8pack" if bits == 8 else "int4pack"}
        engine = Engine(model, load_tokenizer(tiny_tokenizer_file, model.cfg.special), GenerationConfig(max_new_tokens=6))
        fast = engine.generate(prompts)
        for m in model.modules():
            if getattr(m, "bits", 0):
                m.prepare_("dequant")  # plain dequantize + matmul
        plain = engine.generate(prompts)
        assert [r.token_ids for r in fast] == [r.token_ids for r in plain]


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
