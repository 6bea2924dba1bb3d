"""tools/gpu_check.py, the one command for a GPU machine, cannot rot where there is no GPU: its dry run
goes through the plumbing (arguments, the stage runner, the reports), and its stage runner ends a stage
at its timeout and goes on with the next."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import gpu_report  # noqa: E402

CUDA_STAGES = {"cuda_tests", "server", "hbm_bandwidth", "bench_fp16", "bench_int4", "bench_int8"}


def test_the_dry_run_writes_both_reports_with_every_cuda_stage_skipped(tmp_path):
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert set(stages) == {"environment", "install", *CUDA_STAGES}
    assert stages["environment"]["status"] == "passed" and (out / "logs" / "environment.log").exists()
    reason = "dry run" if torch.cuda.is_available() else "no CUDA"
    for name in CUDA_STAGES:
        assert (stages[name]["status"], stages[name]["reason"]) == ("skipped", reason), stages[name]
        assert stages[name]["command"]  # what it would run is in the report
    assert stages["install"]["status"] == "skipped"  # a dry run installs nothing
    assert report["dry_run"] and report["wall_s"] < report["budget_s"]
    markdown = (out / "report.md").read_text()
    assert markdown.count(f"skipped: {reason}") == len(CUDA_STAGES)


def test_a_stage_past_its_timeout_is_reported_and_the_next_stages_still_run(tmp_path):
    py = sys.executable
    stages = [
        # blocks for ever: it reads a pipe whose write end it holds itself, so no end of file comes
        gpu_check.Stage("blocks", [py, "-c", "import os; r, w = os.pipe(); os.read(r, 1)"], timeout_s=1),
        gpu_check.Stage("fails", [py, "-c", "raise SystemExit(3)"], timeout_s=30),
        gpu_check.Stage("runs", [py, "-c", "print('ran to the end')"], timeout_s=30),
        gpu_check.Stage("not wanted", [py, "-c", "pass"], timeout_s=30),
    ]
    skip = lambda stage: "not selected" if stage.name == "not wanted" else None  # noqa: E731
    blocks, fails, runs, unwanted = gpu_check.run_all(stages, tmp_path, time.monotonic() + 120, skip)
    assert (blocks.status, blocks.reason, blocks.returncode) == ("timed out", "timed out after 1 s", None)
    assert (fails.status, fails.returncode) == ("failed", 3) and "exit code 3" in fails.reason
    assert (runs.status, runs.reason) == ("passed", "")
    assert (tmp_path / "runs.log").read_text() == "ran to the end\n"
    assert (unwanted.status, unwanted.reason) == ("skipped", "not selected")


def test_stages_beyond_the_checks_bound_are_skipped_not_started(tmp_path):
    stage = gpu_check.Stage("late", [sys.executable, "-c", "raise SystemExit(1)"], timeout_s=30)
    (late,) = gpu_check.run_all([stage], tmp_path, time.monotonic(), lambda s: None)
    assert late.status == "skipped" and late.reason.startswith("out of time")
    assert not (tmp_path / "late.log").exists()


def test_a_check_after_exit_0_can_fail_the_stage(tmp_path):
    stage = gpu_check.Stage("wrote nothing", [sys.executable, "-c", "pass"], timeout_s=30,
                            check=gpu_check._file_check(tmp_path / "result.json"))
    (outcome,) = gpu_check.run_all([stage], tmp_path, time.monotonic() + 60, lambda s: None)
    assert (outcome.status, outcome.reason) == ("failed", "wrote no result.json")


def test_the_bench_is_scaled_to_the_whole_model_by_the_bytes_a_step_reads():
    bench = {"layers": 8, "context": 127, "read_bytes_per_step": 4e9, "label": "sim",
             "prefill_ms": {"512": {"median": 16.0}}, "decode_ms_per_step": {"1": {"median": 2.0}, "8": {"median": 4.0}}}
    r = gpu_report.scale_decode(bench, copy_gbs=2500.0, weight_ratio=8.0, kv_token_layer_bytes=1000)
    one, eight = r["decode"]["1"], r["decode"]["8"]
    assert one["read_gbs"] == pytest.approx((4e9 + 128 * 8000) / 2e-3 / 1e9)
    assert one["of_copy_bandwidth"] == pytest.approx(one["read_gbs"] / 2500)
    assert one["full_ms_per_step"] == pytest.approx(2.0 * (32e9 + 128 * 70_000) / (4e9 + 128 * 8000))
    assert eight["full_tokens_per_s"] == pytest.approx(8e3 / eight["full_ms_per_step"])
    assert r["prefill"]["512"]["full_ms"] == pytest.approx(16.0 * 70 / 8)


def test_the_wheel_list_comes_from_the_check_and_unknown_stages_are_refused():
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--requirements"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.split() == list(gpu_check.REQUIREMENTS.values())
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--stages", "server,nope"])
