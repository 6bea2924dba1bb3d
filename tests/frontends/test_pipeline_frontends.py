"""The front ends on a pipeline of two stages (`pipeline_parallel=2` under torchrun, with batch_size 4: two
lanes, so two batches in flight): the HTTP server streams several requests at once with the answers of one
rank, and a batch job resumes after the lines already written."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest

from glm_tp.dev.demo_corpus import held_out
from tests.frontends.test_two_nodes import _answers, _prompts
from tests.server.test_server_process import ServerProcess
from tests.support import ROOT
from tests.support.server import DEMO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun's process groups")
PIPELINE = ["pipeline_parallel=2", "batch_size=4", "timeout_s=60"]


def _streamed(url: str, prompt: str, out: list[str], i: int) -> None:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 8, "stream": True}
    text = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += [c.get("text", "") for c in json.loads(line[6:])["choices"]]
    out[i] = "".join(text)


def test_the_server_on_two_stages_streams_concurrent_requests_as_one_rank():
    cases = held_out("cycle", 3) + held_out("recall", 3)
    server = ServerProcess(2, DEMO, *PIPELINE)
    try:
        assert server.complete(prompt=cases[0].prompt)["choices"][0]["text"] == \
            cases[0].prompt.replace("[MASK]", cases[0].answers[0])
        texts = [""] * len(cases)
        threads = [threading.Thread(target=_streamed, args=(server.url, c.prompt, texts, i))
                   for i, c in enumerate(cases)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert texts == [c.answers[0] for c in cases], server.output[-2000:]  # a stream carries the fills
    finally:
        server.kill()


def test_a_batch_job_on_two_stages_resumes_after_the_lines_written(tmp_path):
    src = _prompts(tmp_path / "in.jsonl", 8)
    common = [f"checkpoint={DEMO}", f"tokenizer={DEMO / 'tokenizer.model'}", f"input={src}"]
    one = tmp_path / "one.jsonl"
    alone = subprocess.run([sys.executable, "-m", "glm_tp.generate", *common, f"output={one}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-2000:]
    out = tmp_path / "two.jsonl"
    out.write_text("".join(one.read_text().splitlines(keepends=True)[:3]))  # a job cut short after 3 lines
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "glm_tp.generate", *common, f"output={out}", *PIPELINE],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "5 done, 0 failed, 3 skipped" in run.stdout + run.stderr
    assert _answers(out) == _answers(one) and len(_answers(one)) == 8
