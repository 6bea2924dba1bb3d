"""The package as a user installs it: a wheel built from the checkout, installed into a fresh virtual
environment (torch and the other requirements come from the system's site-packages, nothing from the
network), and its console commands run from a folder outside the checkout. The bundled configs, demo model
and playground page must come from the installed package, and a user's relative paths from their folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from glm_tp.dev.demo_corpus import held_out
from tests.support import ROOT
from tests.support.wait import wait_until

CASE = held_out("cycle", 1)[0]
EXPECTED = CASE.prompt.replace("[MASK]", CASE.answers[0])


def _env() -> dict[str, str]:
    """No PYTHONPATH: the checkout must not shadow the installed copy."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the wheel; the build runs on a copy so the checkout stays clean."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    shutil.copytree(ROOT / "glm_tp", src / "glm_tp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(base / "dist"), str(src)], base)
    wheel = next((base / "dist").glob("glm_tp-*.whl"))
    env = base / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], base)
    _run([str(env / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index",
          str(wheel)], base)
    return env


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working folder outside the checkout, with nothing of glm-tp's in it."""
    assert not tmp_path.is_relative_to(ROOT)
    return tmp_path


def test_the_installed_package_shadows_the_checkout(venv, elsewhere):
    found = _run([str(venv / "bin" / "python"), "-c", "import glm_tp; print(glm_tp.__file__)"], elsewhere)
    assert Path(found.stdout.strip()).resolve().is_relative_to(venv.resolve())


def test_the_wheel_carries_every_module_configs_playground_and_demo(venv):
    package = next((venv / "lib").glob("python*/site-packages/glm_tp"))
    configs = {p.relative_to(ROOT / "glm_tp").as_posix() for p in (ROOT / "glm_tp" / "configs").rglob("*.yaml")}
    demo = {p.relative_to(ROOT / "glm_tp").as_posix() for p in (ROOT / "glm_tp" / "demo").rglob("*") if p.is_file()}
    modules = {p.relative_to(ROOT / "glm_tp").as_posix() for p in (ROOT / "glm_tp").rglob("*.py")}
    for name in sorted(configs | demo | modules | {"server/playground.html"}):
        assert (package / name).is_file(), f"{name} is missing from the wheel"


def test_a_batch_job_reads_and_writes_the_users_folder(venv, elsewhere):
    (elsewhere / "prompts.jsonl").write_text(json.dumps({"id": "a", "prompt": CASE.prompt}) + "\n")
    _run([str(venv / "bin" / "glm-tp-generate"), "input=prompts.jsonl", "generation.max_new_tokens=8"], elsewhere)
    [record] = [json.loads(line) for line in (elsewhere / "prompts.results.jsonl").read_text().splitlines()]
    assert record["id"] == "a" and CASE.answers[0] in json.dumps(record), record


def test_piped_prompts_fill_blanks_on_the_bundled_demo(venv, elsewhere):
    done = _run([str(venv / "bin" / "glm-tp-generate"), "generation.max_new_tokens=8"], elsewhere,
                input=CASE.prompt + "\n")
    assert EXPECTED in done.stdout, done.stdout[-2000:]


class Server:
    """`glm-tp-generate input=http server.port=0`: the URL is read from its output as it starts."""

    def __init__(self, command: Path, cwd: Path):
        self.proc = subprocess.Popen([str(command), "input=http", "server.port=0", "server.model_name=demo"], cwd=cwd,
                                     env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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

    def close(self) -> None:
        self.proc.terminate()
        try:
            assert self.proc.wait(timeout=60) == 0, self.output[-3000:]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_the_server_serves_the_playground_and_completions(venv, elsewhere):
    server = Server(venv / "bin" / "glm-tp-generate", elsewhere)
    try:
        page = httpx.get(server.url + "/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        r = httpx.post(server.url + "/v1/completions", json={"model": "demo", "prompt": CASE.prompt, "max_tokens": 8},
                       timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == EXPECTED, r.text
    finally:
        server.close()


@pytest.mark.parametrize("command", ["glm-tp-make-checkpoint", "glm-tp-verify", "glm-tp-repartition",
                                     "glm-tp-quantize"])
def test_the_tool_commands_are_installed(venv, elsewhere, command):
    assert "usage:" in _run([str(venv / "bin" / command), "--help"], elsewhere).stdout


def test_verify_checks_the_installed_demo(venv, elsewhere):
    package = next((venv / "lib").glob("python*/site-packages/glm_tp"))
    done = _run([str(venv / "bin" / "glm-tp-verify"), str(package / "demo")], elsewhere)
    assert "readable" in done.stdout
