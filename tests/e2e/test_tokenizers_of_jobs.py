"""Which runs need a tokenizer: the tiny preset's random checkpoint brings one, so glm-tp-generate takes text
prompts on it; a JSONL job of token ids alone runs on a checkpoint without any, and one with a text line is
refused before the model loads, naming the line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def _generate(ckpt: Path, lines: list[dict], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run([sys.executable, "-m", "glm_tp.generate", f"checkpoint={ckpt}", f"input={job}",
                           f"output={out}", "generation.max_new_tokens=3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    records = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return done, records


def test_the_tiny_presets_checkpoint_takes_text_prompts(tmp_path):
    subprocess.run([sys.executable, "tools/make_checkpoint.py", str(tmp_path / "tiny"), "--preset", "tiny"], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    done, records = _generate(tmp_path / "tiny", [{"id": "t", "prompt": "monday tuesday [MASK]"}], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert records[0]["error"] is None and records[0]["text"].startswith("monday tuesday")


def test_a_job_of_token_ids_needs_no_tokenizer(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints[1]  # random weights, no tokenizer anywhere
    assert not list(ckpt.glob("*.model"))
    done, records = _generate(ckpt, [{"id": "a", "prompt_token_ids": [5, 6, 1001]},
                                     {"id": "b", "prompt_token_ids": [7, 1000, 8]}], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["id"] for r in records] == ["a", "b"] and all(r["error"] is None for r in records)
    assert all(len(r["token_ids"]) > 3 and r["text"] == "" for r in records)  # the ids are the answer


def test_a_text_line_without_a_tokenizer_is_refused_before_loading(tiny_checkpoints, tmp_path):
    done, records = _generate(tiny_checkpoints[1], [{"id": "a", "prompt_token_ids": [5, 6, 1001]},
                                                    {"id": "b", "prompt": "one [MASK]"}], tmp_path)
    assert done.returncode == 2 and records == []
    assert "line 2 of" in done.stderr and "needs a tokenizer" in done.stderr and "point tokenizer=" in done.stderr
    assert "loading rank" not in done.stderr and "Traceback" not in done.stderr
