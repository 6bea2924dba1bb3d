"""End-to-end front ends under torchrun (2 ranks, gloo): the TTY through a pseudo-terminal, JSONL batch
jobs killed and resumed, SIGTERM, OpenAI lines and a lost worker."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.support import ROOT
from tests.support.terminal import (
    Terminal,
    batch_input,
    find_rank,
    launch_cmd,
    read_output,
    read_until,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux pseudo-terminal")


def test_tty_multiline_settings_interrupt_and_exit(tiny_checkpoints, tiny_tokenizer_file):
    term = Terminal(launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, "generation.max_new_tokens=6"))
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


def test_batch_killed_midway_resumes_without_loss_or_duplicates(tiny_checkpoints, tiny_tokenizer_file, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    keys = batch_input(src, 30)
    cmd = launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, f"input={src}", f"output={out}", "batch_size=2",
               "generation.max_new_tokens=12", "generation.min_new_tokens=12")
    job = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 6, 120, "6 answers in the output")
    os.killpg(job.pid, signal.SIGKILL)  # the whole torchrun process group, at any moment
    job.wait()
    partial = out.read_text().splitlines()
    assert 6 <= len(partial) < len(keys)

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped" in done.stdout
    records = read_output(out)  # every line parses
    got = [r.get("custom_id", r.get("id")) for r in records]
    assert sorted(got) == sorted(keys)  # each id exactly once
    by_key = dict(zip(got, records))
    assert "not valid JSON" in by_key["line-8"]["error"] and by_key["line-8"]["line"] == 8
    assert "max length" in by_key["p-11"]["error"]
    oa = by_key["oa-3"]
    assert oa["response"]["status_code"] == 200 and oa["response"]["body"]["choices"][0]["text"]
    assert by_key["p-0"]["blanks"] and by_key["p-0"]["error"] is None


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; nobody may be left to reap it


def test_ranks_do_not_outlive_a_killed_torchrun_and_a_results_file_has_one_writer(tiny_checkpoints,
                                                                                   tiny_tokenizer_file, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    keys = batch_input(src, 200)

    def command(tokens: int) -> list[str]:
        return launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, f"input={src}", f"output={out}",
                          "batch_size=2", f"generation.max_new_tokens={tokens}", f"generation.min_new_tokens={tokens}")
    cmd = command(48)  # long enough to be running when the second run starts, on any machine
    job = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 120, "2 answers in the output")
        ranks = [find_rank(job.pid, r) for r in (0, 1)]
        assert None not in ranks
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0 and "is being written by another run" in second.stdout + second.stderr
        os.kill(job.pid, signal.SIGKILL)  # torchrun alone: its ranks are told by the kernel
        job.wait()
        wait_until(lambda: not any(_running(pid) for pid in ranks), 120, "the ranks to end after their launcher")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert len(read_output(out)) < len(keys)  # stopped early: the rerun has lines left to answer
    done = subprocess.run(command(2), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = [r.get("custom_id", r.get("id")) for r in read_output(out)]
    assert sorted(got) == sorted(keys)  # each id exactly once: nothing was written twice


def test_sigterm_finishes_the_batch_and_exits_cleanly(tiny_checkpoints, tiny_tokenizer_file, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    keys = batch_input(src, 40)
    cmd = launch_cmd(tiny_checkpoints[1], tiny_tokenizer_file, 1, f"input={src}", f"output={out}", "batch_size=2",
               "generation.max_new_tokens=30", "generation.min_new_tokens=30")
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 120, "2 answers in the output")
    job.send_signal(signal.SIGTERM)
    stdout, _ = job.communicate(timeout=120)
    assert job.returncode == 0
    assert "stopped by SIGTERM" in stdout
    lines = read_output(out)  # every line complete
    assert 2 <= len(lines) < len(keys)


def test_lost_worker_fails_the_job_without_hanging(tiny_checkpoints, tiny_tokenizer_file):
    cmd = launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, "timeout_s=20")
    job = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        early = read_until(job.stderr, "glm-tp: ready")  # every rank has loaded: rank 1 follows rank 0 now
        worker = find_rank(job.pid, 1)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        _, stderr = job.communicate(timeout=180)  # a hang, not a slow machine, takes this long
        stderr = early + stderr
        assert job.returncode != 0
        assert re.search(r"rank\s*: 1 .*\n.*exitcode\s*: -9", stderr)  # the report names the lost rank
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


