"""Two "nodes" on this machine, as on a real cluster: two torchrun processes (`--nnodes 2`) meet through
torchrun's c10d rendezvous on 127.0.0.1 and run one job as TP 2 x PP 2 (a stage per node), PP 2 x TP 1 or
PP 4 x TP 1. Its answers equal one rank's on the demo model and on a random checkpoint; a node killed mid-job
ends the other with one line within the collective timeout, with the stages of a step in turn (batch_size 2:
one lane) or in flight at once (batch_size 4: two lanes, engine/lanes.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.terminal import read_output
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux process groups")
DEMO = ROOT / "glm_tp" / "demo"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(port: int, run_id: str, *args: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
           "-m", "glm_tp.generate", *args]
    return subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _prompts(path: Path, count: int) -> Path:
    kinds = ["the quick [MASK] fox number {}", "one [sMASK] three {} [MASK] five", "monday {} [gMASK]"]
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": kinds[i % 3].format(i), "max_new_tokens": 8})
                            + "\n" for i in range(count)))
    return path


def _answers(out: Path) -> dict[str, tuple]:
    return {r["id"]: (r["blanks"], r["error"]) for r in read_output(out)}


@pytest.mark.parametrize("which", ["demo", "random"])
def test_tp_2_x_pp_2_on_two_nodes_answers_as_one_rank(which, tiny_checkpoints, tiny_tokenizer_file, tmp_path):
    ckpt, tok = (DEMO, DEMO / "tokenizer.model") if which == "demo" else (tiny_checkpoints[1], tiny_tokenizer_file)
    src = _prompts(tmp_path / "in.jsonl", 9)
    common = [f"checkpoint={ckpt}", f"tokenizer={tok}", f"input={src}", "batch_size=3", "timeout_s=60"]
    alone = subprocess.run([sys.executable, "-m", "glm_tp.generate", *common, f"output={tmp_path / 'one.jsonl'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-2000:]
    port, out = _port(), tmp_path / "two.jsonl"
    nodes = [_node(port, f"pp-{which}", *common, f"output={out}", "pipeline_parallel=2") for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    one = _answers(tmp_path / "one.jsonl")
    assert _answers(out) == one and len(one) == 9 and all(error is None for _, error in one.values())


@pytest.mark.parametrize("nproc, pp", [(1, 2), (2, 4)])
def test_pipeline_alone_on_two_nodes_answers_as_one_rank(nproc, pp, tmp_path):
    """PP 2 x TP 1 (a rank per node) and PP 4 x TP 1 (two stages per node) on the demo model's 4 layers."""
    src = _prompts(tmp_path / "in.jsonl", 6)
    common = [f"checkpoint={DEMO}", f"tokenizer={DEMO / 'tokenizer.model'}", f"input={src}", "batch_size=4",
              "timeout_s=60"]
    alone = subprocess.run([sys.executable, "-m", "glm_tp.generate", *common, f"output={tmp_path / 'one.jsonl'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-2000:]
    port, out = _port(), tmp_path / "two.jsonl"
    nodes = [_node(port, f"pp{pp}", *common, f"output={out}", f"pipeline_parallel={pp}", nproc=nproc)
             for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    one = _answers(tmp_path / "one.jsonl")
    assert _answers(out) == one and len(one) == 6 and all(error is None for _, error in one.values())


@pytest.mark.parametrize("batch", [2, 4])
def test_a_killed_node_ends_the_other_with_one_line_within_the_timeout(batch, tiny_checkpoints, tiny_tokenizer_file,
                                                                        tmp_path):
    timeout_s = 10
    src = _prompts(tmp_path / "in.jsonl", 400)
    out, port = tmp_path / "out.jsonl", _port()
    args = [f"checkpoint={tiny_checkpoints[1]}", f"tokenizer={tiny_tokenizer_file}", f"input={src}", f"output={out}",
            f"batch_size={batch}", f"timeout_s={timeout_s}", "pipeline_parallel=2", "generation.min_new_tokens=8"]
    nodes = [_node(port, f"pp-kill-{batch}", *args) for _ in range(2)]
    try:
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 4, 300, "4 answers in the output")
        # the node without rank 0 dies, torchrun and ranks alike: the node that writes the output must notice
        writer = next(n for n in nodes if 0 in _ranks(n.pid))
        victim = nodes[1 - nodes.index(writer)]
        for pid in [victim.pid, *_ranks(victim.pid).values()]:
            os.kill(pid, signal.SIGKILL)
        log = writer.communicate(timeout=timeout_s * 6)[0]  # a hang would pass this bound by far
        assert writer.returncode != 0
        assert "lost contact" in log and not re.search(r'File ".*glm_tp', log), log[-3000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)


def _ranks(pid: int) -> dict[int, int]:
    """The world ranks the torchrun process `pid` runs, and their pids (its children, by their RANK)."""
    ranks = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(child)
    return ranks


def test_each_node_holding_only_its_stages_files_answers_as_one_rank(tiny_checkpoints, tiny_tokenizer_file,
                                                                     tmp_path):
    """A checkpoint written per stage, each node with only its own stage's folder: the run takes the recorded
    split (no stage_layers given) and reads nothing of the other stage."""
    from glm_tp.cli import convert

    whole = tmp_path / "stages"
    convert.repartition_main([str(tiny_checkpoints[1]), str(whole), "--tp", "2", "--pp", "2", "--stage-layers", "1,1"])
    iteration = (whole / "latest").read_text().strip()
    homes = []
    for keep in (0, 1):  # node k's copy: stage k's folder alone
        home = tmp_path / f"node{keep}"
        shutil.copytree(whole, home)
        shutil.rmtree(home / iteration / f"stage_{1 - keep:02d}")
        homes.append(home)
    src = _prompts(tmp_path / "in.jsonl", 6)
    common = [f"tokenizer={tiny_tokenizer_file}", f"input={src}", "batch_size=3", "timeout_s=60"]
    alone = subprocess.run([sys.executable, "-m", "glm_tp.generate", f"checkpoint={tiny_checkpoints[1]}", *common,
                            f"output={tmp_path / 'one.jsonl'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-2000:]
    port, out = _port(), tmp_path / "two.jsonl"
    # a static rendezvous fixes which node holds which ranks (node k: stage k)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
                               f"--node-rank={k}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "glm_tp.generate", f"checkpoint={homes[k]}", *common, f"output={out}",
                               "pipeline_parallel=2"],
                              cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for k in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    one = _answers(tmp_path / "one.jsonl")
    assert _answers(out) == one and len(one) == 6 and all(error is None for _, error in one.values())
