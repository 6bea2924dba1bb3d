"""`python -m glm_tp.generate input=http` as users start it: SIGTERM drains and exits 0; under torchrun with
2 ranks the server answers, and killing rank 1 makes it exit non-zero within the collective timeout."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from glm_tp.checkpoints.reshard import rewrite
from glm_tp.dev.demo_corpus import held_out
from tests.support import ROOT
from tests.support.server import DEMO
from tests.support.terminal import find_rank
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find rank 1")
CASE = held_out("cycle", 1)[0]


class ServerProcess:
    """The entry point with server.port=0; its output is collected on a thread, the URL read from it."""

    def __init__(self, nproc: int, checkpoint, *overrides: str):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        cmd = launcher + ["-m", "glm_tp.generate", f"checkpoint={checkpoint}", f"tokenizer={DEMO / 'tokenizer.model'}",
                          "input=http", "server.port=0", "server.model_name=demo", *overrides]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.output = ""
        threading.Thread(target=self._read, daemon=True).start()
        self.url = wait_until(self._url, 120, "the server's URL", lambda: self.output[-3000:])

    def _url(self) -> str | None:
        found = re.search(r"glm-tp server: (http://\S+)", self.output)
        assert found or self.proc.poll() is None, self.output[-3000:]
        return found and found.group(1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output += line

    def complete(self, **body: object) -> dict:
        r = httpx.post(self.url + "/v1/completions", json={"model": "demo", "prompt": CASE.prompt, "max_tokens": 6,
                                                            **body}, timeout=60)
        r.raise_for_status()
        return r.json()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def test_sigterm_finishes_the_stream_in_flight_and_exits_0():
    server = ServerProcess(1, DEMO)
    try:
        assert server.complete()["choices"][0]["text"] == CASE.prompt.replace("[MASK]", CASE.answers[0])
        body = {"model": "demo", "prompt": "one two", "max_tokens": 40, "stream": True, "glm": {"min_new_tokens": 40}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the stream has begun
            server.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest and any('"finish_reason": "length"' in line for line in rest)
        assert server.proc.wait(timeout=60) == 0, server.output[-3000:]
    finally:
        server.kill()


def test_two_ranks_answer_and_a_lost_rank_ends_the_server(tmp_path):
    ckpt = tmp_path / "tp2"
    rewrite(DEMO, ckpt, 2, progress=False)
    server = ServerProcess(2, ckpt, "timeout_s=15")
    try:
        assert server.complete()["choices"][0]["text"] == CASE.prompt.replace("[MASK]", CASE.answers[0])
        worker = find_rank(server.proc.pid, 1)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        health: list[int | None] = []

        def ended() -> bool:
            if server.proc.poll() is not None:
                return True
            try:
                health.append(httpx.get(server.url + "/health", timeout=2).status_code)
            except httpx.HTTPError:
                health.append(None)  # the port has closed
            return False

        wait_until(ended, 180, "the server to exit after losing rank 1", lambda: server.output[-3000:], interval=0.2)
        assert server.proc.wait(timeout=5) != 0
        assert health and health[-1] != 200  # /health failed (503) or the server was gone before the end
    finally:
        server.kill()


def test_a_stopped_rank_ends_the_server_without_waiting_on_the_launcher_and_errors_show_no_build_paths(tmp_path):
    ckpt = tmp_path / "tp2"
    rewrite(DEMO, ckpt, 2, progress=False)
    server = ServerProcess(2, ckpt, "timeout_s=10")
    try:
        worker = find_rank(server.proc.pid, 1)
        assert worker is not None
        body = {"model": "demo", "prompt": "one two", "max_tokens": 60, "stream": True, "glm": {"min_new_tokens": 60}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)  # the stream has begun
            os.kill(worker, signal.SIGSTOP)  # hung, not gone: the launcher alone would wait its grace period
            rest = list(lines)
        errors = [line for line in rest if '"error"' in line]
        assert errors and "the engine stopped" in errors[0], rest[-3:]
        assert not any(mark in errors[0] for mark in (".cc:", "third_party", "/pytorch/")), errors[0]
        assert server.proc.wait(timeout=120) != 0
        assert "stopped the other ranks on this host" in server.output, server.output[-3000:]
        assert ".cc:" not in server.output.split("Root Cause")[0], server.output[-3000:]
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
        server.kill()
