"""End-to-end front ends under torchrun (2 ranks, gloo): the TTY through a pseudo-terminal, JSONL batch
jobs killed and resumed, SIGTERM, OpenAI lines, a lost worker, and the memory planner."""
from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux pseudo-terminal")


def _cmd(ckpt: Path, tok: Path, nproc: int, *overrides: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return launcher + ["-m", "glm_tp.generate", f"checkpoint={ckpt}", f"tokenizer={tok}", *overrides]


class Terminal:
    """A command on a pseudo-terminal that we type into and read from."""

    def __init__(self, cmd: list[str]):
        self.master, slave = os.openpty()

        def controlling_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     preexec_fn=controlling_tty, env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while not re.search(pattern, self.seen):
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen so far:\n{self.seen[-3000:]}")
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the program exited and closed the terminal
                    raise AssertionError(f"program ended before {pattern!r}:\n{self.seen[-3000:]}") from None
        found = self.seen
        self.seen = self.seen[re.search(pattern, self.seen).end():]
        time.sleep(0.3)  # a person types after the prompt appears; readline takes the terminal meanwhile
        return found

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())


def test_tty_multiline_settings_interrupt_and_exit(tiny_checkpoints, tiny_tokenizer_file):
    term = Terminal(_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, "generation.max_new_tokens=6"))
    try:
        term.expect(">>> ")
        term.send("the quick \\\n")  # a continued line
        term.expect(r"\.\.\. ")
        term.send("brown [MASK] fox\n")
        first = term.expect(">>> ")
        assert "the quick \nbrown" in first.replace("\r", "") and "fox" in first  # the newline is kept
        term.send("/set max_new_tokens 1\n")
        term.expect("max_new_tokens=1")
        term.send("the quick \\\n")
        term.expect(r"\.\.\. ")
        term.send("brown [MASK] fox\n")
        second = term.expect(">>> ")
        assert second != first  # one generated token instead of six
        term.send("/set max_new_tokens 100\n")
        term.send("/set min_new_tokens 100\n")
        term.expect("min_new_tokens=100")
        # Ctrl-C typed right behind the prompt: the 100-token generation is cut short on every rank
        term.send("one two [gMASK]\n\x03")
        term.expect(r"\(interrupted\)", timeout=60)
        term.expect(">>> ")
        term.send("/set min_new_tokens 0\n/set max_new_tokens 2\n")
        term.expect("max_new_tokens=2")
        term.send("monday [MASK]\n")
        term.expect(r"monday \[MASK\]")  # the echo; keys typed during a generation are dropped,
        term.expect(">>> ")                # so wait for the next prompt before Ctrl-D
        term.send("\x04")  # EOF shuts every rank down
        assert term.proc.wait(timeout=60) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def _batch_input(path: Path, count: int) -> list[str]:
    keys = []
    with path.open("w") as f:
        for i in range(count):
            if i % 5 == 3:
                body = {"prompt": "one two [MASK] four", "max_tokens": 12}
                f.write(json.dumps({"custom_id": f"oa-{i}", "method": "POST", "url": "/v1/completions",
                                    "body": body}) + "\n")
                keys.append(f"oa-{i}")
            elif i == 7:
                f.write("{this is not json\n")
                keys.append(f"line-{i + 1}")
            elif i == 11:
                f.write(json.dumps({"id": f"p-{i}", "prompt": "one " * 400}) + "\n")
                keys.append(f"p-{i}")
            else:
                f.write(json.dumps({"id": f"p-{i}", "prompt": f"the quick [MASK] fox number {i}"}) + "\n")
                keys.append(f"p-{i}")
    return keys


def _read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_killed_midway_resumes_without_loss_or_duplicates(tiny_checkpoints, tiny_tokenizer_file, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    keys = _batch_input(src, 30)
    cmd = _cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, f"input={src}", f"output={out}", "batch_size=2",
               "generation.max_new_tokens=12", "generation.min_new_tokens=12")
    job = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 6) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the whole torchrun process group, at any moment
    job.wait()
    partial = out.read_text().splitlines()
    assert 6 <= len(partial) < len(keys)

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped" in done.stdout
    records = _read_output(out)  # every line parses
    got = [r.get("custom_id", r.get("id")) for r in records]
    assert sorted(got) == sorted(keys)  # each id exactly once
    by_key = dict(zip(got, records))
    assert "not valid JSON" in by_key["line-8"]["error"] and by_key["line-8"]["line"] == 8
    assert "max length" in by_key["p-11"]["error"]
    oa = by_key["oa-3"]
    assert oa["response"]["status_code"] == 200 and oa["response"]["body"]["choices"][0]["text"]
    assert by_key["p-0"]["blanks"] and by_key["p-0"]["error"] is None


def test_a_line_cut_by_a_crash_is_dropped_before_resuming(tmp_path):
    from glm_tp.frontends.batch import done_keys

    out = tmp_path / "out.jsonl"
    whole = "".join(json.dumps({"id": f"p-{i}", "text": "x" * 300}) + "\n" for i in range(500))
    out.write_text(whole + '{"id": "p-500", "te')
    assert done_keys(out) == {f"p-{i}": 1 for i in range(500)} and out.read_text() == whole
    assert done_keys(out) == {f"p-{i}": 1 for i in range(500)} and out.read_text() == whole  # complete: untouched


def test_sigterm_finishes_the_batch_and_exits_cleanly(tiny_checkpoints, tiny_tokenizer_file, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    keys = _batch_input(src, 40)
    cmd = _cmd(tiny_checkpoints[1], tiny_tokenizer_file, 1, f"input={src}", f"output={out}", "batch_size=2",
               "generation.max_new_tokens=30", "generation.min_new_tokens=30")
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    stdout, _ = job.communicate(timeout=120)
    assert job.returncode == 0
    assert "stopped by SIGTERM" in stdout
    lines = _read_output(out)  # every line complete
    assert 2 <= len(lines) < len(keys)


def test_lost_worker_fails_the_job_without_hanging(tiny_checkpoints, tiny_tokenizer_file):
    cmd = _cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, "timeout_s=20")
    job = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        worker = None
        while worker is None and time.time() < deadline:
            worker = _find_rank(job.pid, 1)
            time.sleep(0.5)
        assert worker is not None
        time.sleep(3)  # let it load and enter the worker loop
        os.kill(worker, signal.SIGKILL)
        start = time.time()
        _, stderr = job.communicate(timeout=90)
        assert job.returncode != 0 and time.time() - start < 90
        assert re.search(r"rank\s*: 1 .*\n.*exitcode\s*: -9", stderr)  # the report names the lost rank
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def _find_rank(parent: int, rank: int) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"GROUP_RANK=0" in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                return int(pid)
    return None
