"""A job under torchrun (2 ranks, gloo) that meets trouble: a rank killed or hung while the TTY waits, a
SIGTERM to the job during a batch, a truncated shard. Each ends with one clear line from glm-tp, no hang, and
a terminal left as it was. The collective timeouts (timeout_s) are short so the waits stay short; the tests'
own waits are long, to find a hang without failing a slow machine."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.support import ROOT
from tests.support.terminal import (
    Terminal,
    batch_input,
    find_rank,
    launch_cmd,
    read_output,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux pseudo-terminals and /proc")


def _wait_for_rank(parent: int, rank: int, timeout: float = 120) -> int:
    return wait_until(lambda: find_rank(parent, rank), timeout, f"rank {rank} to start")


def _assert_terminal_restored(term: Terminal) -> None:
    """The pseudo-terminal's settings (read through its master side) are a fresh terminal's again."""
    attrs = termios.tcgetattr(term.master)
    assert attrs[6][termios.VINTR] == b"\x03", "Ctrl-C no longer interrupts"
    assert attrs[3] & termios.ICANON and attrs[3] & termios.ECHO, "line editing or echo left off"


def _rest(term: Terminal, timeout: float) -> str:
    """Everything the program prints until it closes the terminal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            term.expect(r"\Z.", timeout=1)  # never matches: only reads
        except AssertionError as e:
            if "program ended" in str(e):
                return term.seen
    raise AssertionError(f"the program did not end within {timeout} s:\n{term.seen[-3000:]}")


def _no_traceback_from_glm_tp(text: str) -> None:
    assert not re.search(r'File ".*glm_tp', text) and "Exception in thread" not in text, text[-3000:]


def test_a_rank_killed_at_the_prompt_ends_the_tty_and_restores_the_terminal(tiny_checkpoints, tiny_tokenizer_file):
    term = Terminal(launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, "timeout_s=20"))
    try:
        term.expect(">>> ")
        assert termios.tcgetattr(term.master)[6][termios.VINTR] != b"\x03"  # the TTY took Ctrl-C over
        os.kill(_wait_for_rank(term.proc.pid, 1), signal.SIGKILL)
        screen = _rest(term, 120)
        assert re.search(r"glm-tp: stopped by SIGTERM|error on rank 0: lost contact", screen), screen[-3000:]
        _no_traceback_from_glm_tp(screen)
        term.proc.wait(timeout=30)
        _assert_terminal_restored(term)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_a_hung_rank_ends_the_idle_tty_with_one_line_found_by_the_keepalives(tiny_checkpoints, tiny_tokenizer_file):
    timeout_s = 8
    term = Terminal(launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, f"timeout_s={timeout_s}"))
    worker = None
    try:
        term.expect(">>> ")
        worker = _wait_for_rank(term.proc.pid, 1)
        os.kill(worker, signal.SIGSTOP)
        # only the keep-alives' collectives (4 per timeout) can find a hang while the TTY waits: without them
        # rank 0 would wait at the prompt for ever. They find it within about 1.25 timeouts; the wait allows for load.
        term.expect(r"error on rank 0: lost contact with the other ranks[^\n]*\n", timeout=120)
        os.kill(worker, signal.SIGKILL)  # torchrun would wait its 30 s grace for the stopped rank
        screen = _rest(term, 120)
        _no_traceback_from_glm_tp(screen)
        assert "ready" not in screen
        _assert_terminal_restored(term)
    finally:
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if term.proc.poll() is None:
            term.proc.kill()


def test_sigterm_to_torchrun_finishes_the_batch_and_every_rank_exits_0(tiny_checkpoints, tiny_tokenizer_file,
                                                                       tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    keys = batch_input(src, 40)
    inner = launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 1, f"input={src}", f"output={out}", "batch_size=2",
                 "generation.max_new_tokens=30", "generation.min_new_tokens=30")
    # each rank runs under a shell that reports its exit status; `trap :` lets the shell outlive the SIGTERM
    # that torchrun sends to the rank's process group while leaving the rank's own SIGTERM handling alone
    script = "trap : TERM; " + " ".join(f"'{a}'" for a in inner) + '; echo "rank $RANK exit $?"'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           "sh", "-c", script]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 120, "2 answers in the output")
        job.send_signal(signal.SIGTERM)
        # past torchrun's own grace of 30 s it kills the ranks: the "exit 0" lines below show it did not come to that
        stdout, _ = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert "rank 0 exit 0" in stdout and "rank 1 exit 0" in stdout, stdout[-3000:]
    assert "stopped by SIGTERM" in stdout and "lost contact" not in stdout
    lines = read_output(out)  # every line complete
    assert 2 <= len(lines) < len(keys)


def test_a_truncated_shard_stops_every_rank_before_ready_with_the_cause_last(tiny_checkpoints, tiny_tokenizer_file,
                                                                            tmp_path):
    ckpt = tmp_path / "ckpt"
    subprocess.run(["cp", "-r", str(tiny_checkpoints[2]), str(ckpt)], check=True)
    shard = ckpt / "1" / "mp_rank_01_model_states.pt"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    job = subprocess.run(launch_cmd(ckpt, tiny_tokenizer_file, 2), cwd=ROOT, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    out = job.stdout + job.stderr
    assert job.returncode != 0 and "ready" not in out
    ours = [line for line in out.splitlines() if line.startswith("error:")]
    # the recorded file sizes catch it on every rank before loading: one line, naming the file
    assert len(ours) == 1 and "mp_rank_01" in ours[0] and "truncated" in ours[0] and len(ours[0]) < 400, out[-3000:]
    # torchrun's failure report ends with our line (its root cause), so the cause is what the user sees last
    tail = [line for line in job.stderr.splitlines() if line.strip() and not set(line.strip()) <= {"="}]
    assert "mp_rank_01" in tail[-1] and "truncated" in tail[-1], tail[-5:]
    _no_traceback_from_glm_tp(out)


def test_error_file_format_is_what_torchrun_reads(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from glm_tp.cli.generate import report

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    report("error: something named")
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(path))
    assert failure.message["extraInfo"]["py_callstack"] == "error: something named"
    assert abs(failure.timestamp - time.time()) < 60
    assert json.loads(path.read_text())["message"]["message"] == "error: something named"


@pytest.mark.parametrize("nproc, overrides, expected", [
    (2, ["batch_size=0"], "error: batch_size=0: must be a whole number >= 1"),
    (3, [], "error: tensor-parallel size 3 does not divide this model"),  # told the rank counts that work
])
def test_a_shared_error_under_torchrun_is_one_line_and_the_last_one(tiny_checkpoints, tiny_tokenizer_file, nproc,
                                                                     overrides, expected):
    job = subprocess.run(launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, nproc, *overrides), cwd=ROOT,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    ours = [line for line in job.stderr.splitlines() if line.startswith("error")]
    assert job.returncode != 0 and len(ours) == 1 and ours[0].startswith(expected), job.stderr[-3000:]
    tail = [line for line in job.stderr.splitlines() if line.strip() and not set(line.strip()) <= {"="}]
    assert tail[-1].strip() == f"traceback : {ours[0]}", tail[-5:]
    if nproc == 3:
        assert ours[0].endswith("valid sizes: 1, 2, 4, 8") and "ready" not in job.stderr
    _no_traceback_from_glm_tp(job.stdout + job.stderr)


def test_sigterm_to_torchrun_stops_the_tty_generation_and_quits_cleanly(tiny_checkpoints, tiny_tokenizer_file):
    term = Terminal(launch_cmd(tiny_checkpoints[2], tiny_tokenizer_file, 2, "generation.max_new_tokens=100",
                         "generation.min_new_tokens=100"))
    try:
        term.expect(">>> ")
        term.send("one two [gMASK]\n")
        term.expect(r"one two \[gMASK\]")
        wait_until(term.generating, 120, "the 100-token generation to begin")  # it takes ~1 s on 2 cores
        term.proc.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
        screen = _rest(term, 120)
        assert "(interrupted)" in screen and "glm-tp: stopped by SIGTERM" in screen, screen[-3000:]
        assert not any(line.strip().startswith("error") for line in screen.splitlines()), screen[-3000:]
        _no_traceback_from_glm_tp(screen)
        _assert_terminal_restored(term)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
