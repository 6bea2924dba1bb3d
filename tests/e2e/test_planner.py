"""The memory planner: GLM-130B's per-rank figures, fits and refusals, and the plan=true dry run."""
from __future__ import annotations

import subprocess
import sys

from glm_tp.cli.planner import GiB, Plan, refusal
from glm_tp.config import PRESETS
from tests.support import ROOT

GLM = PRESETS["glm-130b"]


def test_weight_bytes_per_rank_match_the_release_arithmetic():
    # fp16 TP=8 ~ 32.2 GB, INT8 TP=8 ~ 16.4 GB, INT4 TP=4 ~ 16.8 GB, INT4 TP=8 ~ 8.4 GB
    for tp, bits, want in ((8, 0, 32.2e9), (8, 8, 16.4e9), (4, 4, 16.8e9), (8, 4, 8.4e9)):
        got = Plan(GLM, tp, 2, bits, 1, 2048).weight_bytes
        assert abs(got - want) / want < 0.01, (tp, bits, got)
    # every rank of a random checkpoint holds exactly what the plan says (tiny preset, fp32)
    import torch

    from glm_tp.checkpoints.synthetic import random_shard
    cfg = PRESETS["tiny"]
    shard = random_shard(cfg, 2, 1, 0, torch.float32)
    assert sum(t.numel() * 4 for t in shard.values()) == Plan(cfg, 2, 4, 0, 1, 1).weight_bytes


def test_glm130b_fits_8x40g_tight_and_4x24g_fp16_is_refused_with_int4():
    tight = Plan(GLM, 8, 2, 0, 1, 2048)
    assert tight.fits(40 * GiB) and tight.total_bytes > 0.8 * 40 * GiB
    too_big = Plan(GLM, 4, 2, 0, 1, 2048)
    assert not too_big.fits(24 * GiB)
    line = refusal(too_big, 24 * GiB)
    assert "\n" not in line and "GiB short" in line and "quant=int4" in line.split(" or ")[0]


def test_plan_mode_prints_a_table_without_loading():
    res = subprocess.run([sys.executable, "-m", "glm_tp.generate", "plan=true", "preset=glm-130b",
                          "hardware=4xRTX3090-int4", "batch_size=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "TP=4, int4" in res.stdout and "-> fits" in res.stdout


def _plan(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_tp.generate", "plan=true", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_every_shipped_hardware_preset_fits_glm130b_at_its_defaults():
    for hardware in ("8xA100-40G-fp16", "8xA100-80G", "8xRTX3090-int8", "4xRTX3090-int4"):
        res = _plan("preset=glm-130b", f"hardware={hardware}")
        assert res.returncode == 0 and "-> fits" in res.stdout, (hardware, res.stdout, res.stderr)


def test_plan_knows_the_chatglm_presets_and_the_demo():
    res = _plan("preset=chatglm-6b-int4", "ranks=1", "device_memory_gib=8", "batch_size=1", "dtype=fp16")
    assert res.returncode == 0 and "28 layers x 4096, TP=1, int4" in res.stdout and "-> fits" in res.stdout
    res = _plan("preset=chatglm-6b", "ranks=1", "device_memory_gib=8", "dtype=fp16", "batch_size=1")
    assert "does NOT fit" in res.stdout and "try quant=int4" in res.stdout  # fp16 needs 15 GiB: the fix is named
    assert "4 layers x 192" in _plan("model=demo").stdout


def test_model_demo_loads_the_bundled_model():
    from glm_tp import load_model
    assert load_model(ROOT / "glm_tp" / "demo", model="demo", progress=False).cfg == PRESETS["demo"]


def test_a_grouped_query_models_kv_cache_holds_its_groups_only():
    cfg = PRESETS["tiny-chatglm2"]
    assert cfg.kv_groups and cfg.kv_groups < cfg.num_heads
    for tp in (1, 2, 4):
        per_token = 2 * cfg.num_layers * max(1, cfg.kv_groups // tp) * cfg.head_dim * 2
        assert Plan(cfg, tp, 2, 0, 3, 64).kv_bytes == 3 * 64 * per_token


def test_chatglm2_6b_int4_fits_a_6gb_gpu_and_its_fp16_does_not():
    # an 8k context, as the README's line for a 6 GB GPU runs it
    args = ("model=chatglm2-6b", "ranks=1", "device=cuda", "device_memory_gib=6", "batch_size=1", "dtype=fp16",
            "max_len=8192")
    res = _plan(*args, "quant=int4")
    assert res.returncode == 0 and "28 layers x 4096, TP=1, int4" in res.stdout and "-> fits" in res.stdout, res.stdout
    res = _plan(*args)
    assert "does NOT fit" in res.stdout and "quant=int4" in res.stdout


def test_the_plan_of_a_clone_reads_its_config_json(tmp_path):
    from tests.support.checkpoints import write_clone
    ckpt = write_clone(tmp_path / "q", "chatglm2", "tiny-chatglm2", "--quant", "int4")
    for weights in ckpt.glob("*.safetensors"):  # plan=true reads no weight file
        weights.write_bytes(b"")
    res = _plan(f"checkpoint={ckpt}", "ranks=2", "device_memory_gib=6", "batch_size=1", "max_len=64")
    assert res.returncode == 0 and "3 layers x 128, TP=2, int4" in res.stdout and "-> fits" in res.stdout, res.stderr


def test_the_weight_bytes_are_what_a_grouped_query_rank_holds(tmp_path):
    """Grouped QKV rows (KV groups replicated past TP 2), QKV bias only, INT4 scales: per rank, as loaded."""
    from glm_tp import load_model
    from glm_tp.parallel.dist import simulated_rank
    from tests.support.checkpoints import write_clone
    cfg = PRESETS["tiny-chatglm2"]
    for options, bits in (((), 0), (("--quant", "int4"), 4)):
        ckpt = write_clone(tmp_path / f"c{bits}", "chatglm2", "tiny-chatglm2", *options)
        for tp in (1, 2, 4):
            model = load_model(ckpt, tp=simulated_rank(tp, 0), dtype="fp32", progress=False, kernels="dequant")
            held = sum(p.numel() * p.element_size() for p in model.parameters())
            assert held == Plan(cfg, tp, 4, bits, 1, 1).weight_bytes, (bits, tp)


def _settings(option: str) -> dict[str, int]:
    """'2 ranks with quant=int8 with max_len=16384' -> {'ranks': 2, 'quant': 8, 'max_len': 16384}."""
    out = {}
    for change in option.split(" with "):
        if change.endswith(" ranks"):
            out["ranks"] = int(change.split()[0])
        else:
            key, value = change.split("=")
            out[key] = int(value.removeprefix("int"))
    return out


def test_a_long_context_model_is_offered_a_max_len_that_fits():
    glm4 = PRESETS["glm-4-9b"]  # 131072 tokens by default: its KV cache alone is 40 GiB at batch 8 in bf16
    line = refusal(Plan(glm4, 1, 2, 0, 8, glm4.max_seq_len, "cpu"), 24 * GiB)
    assert "host's available memory" in line
    options = [_settings(o) for o in line.split(": try ")[1].split(" or ")]
    assert any("max_len" in o for o in options)
    for o in options:  # each offer fits as it is written
        pp = o.get("pipeline_parallel", 1)
        assert Plan(glm4, o.get("ranks", 1) // pp, 2, o.get("quant", 0), o.get("batch_size", 8),
                    o.get("max_len", glm4.max_seq_len), "cpu", pp).fits(24 * GiB), o


def test_the_cpu_attention_holds_no_scores_where_cuda_does():
    cfg = PRESETS["chatglm-6b"]  # the reference's recipe on CUDA; ChatGLM2's fused attention holds none
    causal = PRESETS["chatglm2-6b"]
    assert Plan(causal, 1, 2, 4, 1, 8192, "cuda").workspace_bytes - Plan(causal, 1, 2, 4, 1, 8192, "cpu").workspace_bytes \
        == GiB - GiB // 2
    cpu, cuda = (Plan(cfg, 1, 2, 4, 1, 8192, device) for device in ("cpu", "cuda"))
    runtime = GiB - GiB // 2  # a CUDA context's overhead over an interpreter's
    assert cuda.workspace_bytes - cpu.workspace_bytes == cfg.num_heads * 8192 * 8192 * 4 + runtime


def test_a_cpu_run_that_cannot_fit_the_hosts_memory_is_one_line(tmp_path):
    job = tmp_path / "job.jsonl"
    job.write_text('{"prompt": "monday [MASK]"}\n')
    # split the host's available memory between a billion local ranks: no plan fits that share
    env = {**__import__("os").environ, "LOCAL_WORLD_SIZE": str(10 ** 9)}
    res = subprocess.run([sys.executable, "-m", "glm_tp.generate", f"input={job}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 2 and "host's available memory" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "job.results.jsonl").exists() or not (tmp_path / "job.results.jsonl").read_text()


def test_pipeline_stages_hold_their_own_layers_and_a_second_node_is_offered():
    glm130b = PRESETS["glm-130b"]
    one, two = Plan(glm130b, 8, 2, 0, 1, 2048, "cuda"), Plan(glm130b, 8, 2, 0, 1, 2048, "cuda", pp=2)
    assert two.split.sizes() == [35, 35] and 0.45 < two.weight_bytes / one.weight_bytes < 0.55
    assert two.kv_bytes * 2 == one.kv_bytes  # half the layers, half the cache
    line = refusal(one, 24 * GiB)  # GLM-130B in fp16 on 8 x 24 GB: a second node of 8 makes it fit
    assert "16 ranks with pipeline_parallel=2" in line and two.fits(24 * GiB)
    uneven = Plan(PRESETS["glm-4-9b"], 1, 2, 0, 1, 4096, "cuda", pp=4)  # its large embedding and head
    sizes = uneven.split.sizes()
    assert sum(sizes) == 40 and sizes[0] < sizes[1] and sizes[-1] < sizes[1]
    given = Plan(PRESETS["glm-4-9b"], 1, 2, 0, 1, 4096, "cuda", pp=2, stage_sizes=(10, 30))
    assert given.split.sizes() == [10, 30] and given.weight_bytes > uneven.weight_bytes
