"""The memory planner: GLM-130B's per-rank figures, fits and refusals, and the plan=true dry run."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from glm_tp.config import PRESETS
from glm_tp.planner import GiB, Plan, refusal

GLM = PRESETS["glm-130b"]


def test_weight_bytes_per_rank_match_the_release_arithmetic():
    # fp16 TP=8 ~ 32.2 GB, INT8 TP=8 ~ 16.4 GB, INT4 TP=4 ~ 16.8 GB, INT4 TP=8 ~ 8.4 GB
    for tp, bits, want in ((8, 0, 32.2e9), (8, 8, 16.4e9), (4, 4, 16.8e9), (8, 4, 8.4e9)):
        got = Plan(GLM, tp, 2, bits, 1, 2048).weight_bytes
        assert abs(got - want) / want < 0.01, (tp, bits, got)
    # every rank of a random checkpoint holds exactly what the plan says (tiny preset, fp32)
    from glm_tp.synthetic import random_shard
    import torch
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
