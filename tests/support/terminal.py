"""Driving `glm_tp.generate` as a person does: a pseudo-terminal, batch files, torchrun's ranks."""
from __future__ import annotations

import fcntl
import json
import os
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import IO

from tests.support import ROOT
from tests.support.wait import wait_until


def launch_cmd(ckpt: Path, tok: Path, nproc: int, *overrides: str) -> list[str]:
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

    def expect(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen so far:\n{self.seen[-3000:]}")
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the program exited and closed the terminal
                    raise AssertionError(f"program ended before {pattern!r}:\n{self.seen[-3000:]}") from None
        found = self.seen
        self.seen = self.seen[re.search(pattern, self.seen).end():]
        return found

    def reads_keys(self) -> bool:
        """The program reads the terminal key by key (line mode off): readline at a prompt, or a generation
        polling for Ctrl-C. In between, while the program is busy, the terminal is in line mode."""
        return not termios.tcgetattr(self.master)[3] & termios.ICANON

    def generating(self) -> bool:
        """A generation polls the terminal for Ctrl-C: key by key and without blocking (VMIN 0; readline's is 1)."""
        attrs = termios.tcgetattr(self.master)
        return not attrs[3] & termios.ICANON and attrs[6][termios.VMIN] == 0

    def send(self, text: str) -> None:
        """Types `text` once readline has the terminal, as a person types after the prompt appears: typed while
        the terminal is still in line mode, the terminal itself would echo it and readline would show it again."""
        wait_until(self.reads_keys, 120, "the program to read the terminal key by key", lambda: self.seen[-3000:])
        os.write(self.master, text.encode())


def batch_input(path: Path, count: int) -> list[str]:
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


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_until(pipe: IO, pattern: str, timeout: float = 120) -> str:
    """What a child writes to `pipe` until `pattern` shows, as it comes (read unbuffered: what follows is left
    for communicate())."""
    seen, fd = "", pipe.fileno()
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{seen[-3000:]}")
        if select.select([fd], [], [], 0.2)[0]:
            data = os.read(fd, 65536)
            if not data:
                raise AssertionError(f"the output ended before {pattern!r}:\n{seen[-3000:]}")
            seen += data.decode(errors="replace")
    return seen


def find_rank(parent: int, rank: int) -> int | None:
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
