#!/usr/bin/env python
"""The small programs tools/gpu_check.py runs as stages, each in its own process (so a stage's timeout
can end it, and whatever it started, at once), each writing one JSON file:

    python tools/gpu_probes.py environment OUT.json [MODULE ...]   # versions, the device, modules missing
    python tools/gpu_probes.py bandwidth OUT.json                  # HBM bandwidth: a device-to-device copy
    python tools/gpu_probes.py serve OUT.json [DEVICE]             # the demo model served on CUDA (or DEVICE)

The exit code is 0 when the probe did what it checks, 1 otherwise (the JSON says why).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def environment(modules: list[str]) -> tuple[bool, dict]:
    """What the machine has; torch is imported only here, so the check itself starts in no time."""
    info: dict = {"python": platform.python_version(), "machine": platform.machine(),
                  "missing": [m for m in modules if importlib.util.find_spec(m) is None]}
    try:
        import torch
    except ImportError as e:
        return False, {**info, "torch": None, "cuda": False, "error": str(e)}
    info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda=torch.cuda.is_available(),
                triton=_version("triton"), numba=_version("numba"))
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                    sm_count=p.multi_processor_count, device_count=torch.cuda.device_count())
    return True, info


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), "__version__", "?")


def bandwidth(gib: float = 1.0, runs: int = 10) -> tuple[bool, dict]:
    """A copy of `gib` GiB between two device buffers, timed with CUDA events: it reads and writes every
    byte once, so 2 x size / time is the bandwidth the decode step's weight reads are compared with. The
    buffers are far larger than the L2 cache (50 MB on an H100), so the copy streams from HBM."""
    import torch

    n = int(gib * 2 ** 30)
    src = torch.ones(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up: clocks up, the copy kernel loaded
        dst.copy_(src)
    seconds = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    seconds.sort()
    moved = 2 * n
    return True, {"bytes_per_copy": moved, "runs": runs, "best_gbs": moved / seconds[0] / 1e9,
                  "median_gbs": moved / seconds[len(seconds) // 2] / 1e9, "device": torch.cuda.get_device_name()}


def _post(url: str, body: dict, timeout: float = 60) -> tuple[float, bytes]:
    """(seconds, response body) of one JSON POST; HTTP errors raise."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as r:
        data = r.read()
    return time.perf_counter() - start, data


def _requests(url: str) -> list[dict]:
    """A few calls through the server's paths: a batch of prompts, a stream, a chat; each answered blank is
    compared with the demo corpus' answer (informative: the model is small and may miss one)."""
    from glm_tp.dev.demo_corpus import held_out

    cases = held_out("cycle", 3)
    out = []
    seconds, data = _post(url + "/v1/completions", {"model": "demo", "prompt": [c.prompt for c in cases],
                                                    "max_tokens": 6})
    for case, choice in zip(cases, json.loads(data)["choices"]):
        out.append({"call": "completions", "prompt": case.prompt, "text": choice["text"], "s": seconds,
                    "expected": case.answers, "matches": choice["blanks"] == case.answers})
    seconds, data = _post(url + "/v1/completions", {"model": "demo", "prompt": cases[0].prompt, "max_tokens": 6,
                                                    "stream": True})
    events = [line for line in data.decode().splitlines() if line.startswith("data: ")]
    out.append({"call": "completions stream", "prompt": cases[0].prompt, "events": len(events), "s": seconds,
                "matches": events[-1:] == ["data: [DONE]"]})
    seconds, data = _post(url + "/v1/chat/completions", {"model": "demo", "max_tokens": 6,
                                                         "messages": [{"role": "user", "content": cases[1].prompt}]})
    out.append({"call": "chat", "prompt": cases[1].prompt, "s": seconds,
                "text": json.loads(data)["choices"][0]["message"]["content"]})
    return out


def serve(device: str = "cuda") -> tuple[bool, dict]:
    """`python -m glm_tp.generate input=http` on CUDA as a user starts it, a few calls, then SIGTERM (which
    drains and exits 0). Its output goes to this probe's own (the stage's log)."""
    cmd = [sys.executable, "-m", "glm_tp.generate", "input=http", f"device={device}", "server.port=0",
           "server.model_name=demo"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    info: dict = {"command": cmd}
    try:
        url = None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if found := re.search(r"glm-tp server: (http://\S+)", line):
                url = found.group(1)
                break
        if url is None:
            return False, {**info, "error": f"the server exited ({proc.wait()}) before it listened"}
        info["startup_s"] = time.perf_counter() - start
        threading.Thread(target=lambda: [print(x, end="", flush=True) for x in proc.stdout], daemon=True).start()
        info["requests"] = _requests(url)
        proc.send_signal(signal.SIGTERM)
        info["exit_code"] = proc.wait(timeout=60)
        return info["exit_code"] == 0, info
    except Exception as e:  # reported in the JSON, not raised: the report says what failed
        return False, {**info, "error": f"{type(e).__name__}: {e}"}
    finally:
        if proc.poll() is None:
            proc.kill()


def main(argv: list[str]) -> int:
    kind, out, *rest = argv
    try:
        ok, result = {"environment": lambda: environment(rest), "bandwidth": bandwidth,
                      "serve": lambda: serve(*rest)}[kind]()
    except Exception as e:
        ok, result = False, {"error": f"{type(e).__name__}: {e}"}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
