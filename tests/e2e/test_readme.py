"""The README's snippets run as written.

- Every ```python block runs.
- A ```bash block right after the line `<!-- readme-test: run -->` runs command by command (a line ending in
  `\\` continues); blocks without the mark need GPUs, real checkpoints, installs or minutes (their commands
  are still checked: the files they name exist, and glm_tp.generate's key=value settings are valid).
- Of a `pip install ... && COMMAND` line, COMMAND runs (the first thing a new user runs is the CPU demo).
Both run in a scratch folder that links the repository's top-level entries, so relative paths work as in a
checkout and what the commands write stays out of it.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from glm_tp.cli.settings import CONFIG_DIR
from tests.support import ROOT

README = ROOT / "README.md"
RUN_MARK = "<!-- readme-test: run -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[tuple[bool, str]]:
    """(marked to run, text) of each fenced block in `language`."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) == language:
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            out.append((before == RUN_MARK, m.group(2)))
    return out


def commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    return root


def _run(args: list[str] | str, scratch: Path, shell: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(scratch), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(args, cwd=scratch, shell=shell, executable="/bin/bash" if shell else None, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


def test_the_readme_has_runnable_snippets():
    assert blocks("python") and any(marked for marked, _ in blocks("bash"))


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, scratch):
    code = blocks("python")[index][1]
    done = _run([sys.executable, "-c", code], scratch)
    assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"


def after_install(command: str) -> str | None:
    parts = [p.strip() for p in command.split("&&")]
    rest = [p for p in parts if not p.startswith(("pip ", "python -m pytest"))]
    return " && ".join(rest) if parts[0].startswith("pip ") and rest else None


MARKED = [c for marked, b in blocks("bash") if marked for c in commands(b)] + \
    [c for _, b in blocks("bash") for c in map(after_install, commands(b)) if c]


@pytest.mark.parametrize("command", MARKED)
def test_marked_command_runs(command, scratch):
    done = _run(command, scratch, shell=True)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


ALL = [c for _, b in blocks("bash") for c in commands(b)]


@pytest.mark.parametrize("command", ALL)
def test_every_command_names_real_files_and_valid_settings(command):
    words = shlex.split(command)
    for word in words:
        if re.fullmatch(r"(tools|launch|docker|glm_tp)/[\w./-]+", word):
            assert (ROOT / word).exists(), f"{command}: {word} does not exist"
    if "glm_tp.generate" in words:
        settings = [w for w in words[words.index("glm_tp.generate") + 1:] if re.match(r"^[\w.]+=", w)]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            compose("generate", overrides=settings)  # an unknown key or preset raises
