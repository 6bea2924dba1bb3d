#!/usr/bin/env python
"""The GPU check in one command: the CUDA tests, the demo model served on CUDA, the HBM bandwidth, and
tools/bench.py on one TP=8 rank of GLM-130B (a single-rank simulation with a few of its layers) in fp16,
INT4 and INT8, each stage in its own process with its own timeout, the whole bounded to 8 minutes. A
stage that fails or times out is reported and the next one runs.

    bash tools/gpu_wheels.sh                          # where PyPI is reachable: gpu-wheels/
    python tools/gpu_check.py --out gpu-report        # on the GPU machine, from the checkout
    python tools/gpu_check.py --out dry --dry-run     # anywhere, in seconds: the plumbing only

It writes report.json, report.md and logs/<stage>.log (each stage's output) into --out. Missing
dependencies are installed from gpu-wheels/ (no index); the project itself runs from the checkout.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gpu_report

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "gpu-wheels"
# the dependencies a CUDA PyTorch image lacks, by the module that shows they are there; tools/gpu_wheels.sh
# downloads these with everything they need
REQUIREMENTS = {"hydra": "hydra-core>=1.3", "fastapi": "fastapi>=0.110", "uvicorn": "uvicorn>=0.29",
                "pytest": "pytest>=7"}
PRESET, TP = "glm-130b", 8
BUDGET_S = 480.0   # the whole check, reports included
REPORT_S = 5.0     # kept back from the last stage for writing the reports
MIN_STAGE_S = 10.0  # a stage that would get less is skipped: it could not finish anything useful
STAGE_NAMES = ("install", "cuda_tests", "server", "hbm_bandwidth", "bench_fp16", "bench_int4", "bench_int8")


@dataclass
class Stage:
    name: str
    command: list[str]
    timeout_s: float
    cuda: bool = True  # skipped where there is no CUDA device
    # after a run that exited 0: a reason to call it failed after all (None: passed), from what it wrote
    check: Callable[[], str | None] | None = None


@dataclass
class Outcome:
    name: str
    status: str      # passed | failed | timed out | skipped
    reason: str      # why it failed, timed out or was skipped ("" when it passed)
    command: list[str]
    timeout_s: float
    wall_s: float = 0.0
    returncode: int | None = None
    log: str | None = None
    detail: str = ""  # a short line for the table (counts, a number)
    kernels_prepared_s: float | None = None


def child_env() -> dict[str, str]:
    """The checkout first on the path (it is run, not installed); output unbuffered so a killed stage's
    log holds everything up to the kill."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _end_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a stage's process group: the stage, and a server or workers it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_stage(stage: Stage, logs: Path, timeout_s: float) -> Outcome:
    """Runs one stage in its own session (its own process group) with its output in logs/NAME.log."""
    log = logs / f"{stage.name}.log"
    outcome = Outcome(stage.name, "passed", "", stage.command, round(timeout_s, 1), log=str(log))
    start = time.monotonic()
    with log.open("w") as out:
        try:
            proc = subprocess.Popen(stage.command, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return dataclasses.replace(outcome, status="failed", reason=f"could not start: {e}")
        try:
            outcome.returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            outcome.status, outcome.reason = "timed out", f"timed out after {timeout_s:.0f} s"
        finally:
            _end_group(proc)
    outcome.wall_s = round(time.monotonic() - start, 1)
    if outcome.returncode not in (None, 0):
        outcome.status, outcome.reason = "failed", f"exit code {outcome.returncode}: see logs/{log.name}"
    elif outcome.returncode == 0 and stage.check is not None and (why := stage.check()):
        outcome.status, outcome.reason = "failed", why
    return outcome


def skipped(stage: Stage, reason: str) -> Outcome:
    return Outcome(stage.name, "skipped", reason, stage.command, stage.timeout_s)


def run_all(stages: list[Stage], logs: Path, deadline: float, skip: Callable[[Stage], str | None]) -> list[Outcome]:
    """Every stage in turn, each bounded by its own timeout and by what is left before `deadline`."""
    outcomes = []
    for stage in stages:
        left = deadline - time.monotonic()
        if (reason := skip(stage)) is not None:
            outcomes.append(skipped(stage, reason))
        elif left < MIN_STAGE_S:
            outcomes.append(skipped(stage, f"out of time: {left:.0f} s left of the check's bound"))
        else:
            outcomes.append(run_stage(stage, logs, min(stage.timeout_s, left)))
    return outcomes


def cuda_test_files() -> list[str]:
    """The test files with a CUDA path: those that skip where torch sees no CUDA device."""
    marker = "torch.cuda.is_available()"
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if marker in p.read_text())


def _tests_check(junit: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        tests = gpu_report.read_junit(junit)
        missed = [t["test"] for t in tests if t["outcome"] == "skipped" and "no CUDA" in t["message"]]
        if not tests:
            return "no test ran"
        return f"{len(missed)} CUDA test(s) skipped on a CUDA machine: {', '.join(missed)}" if missed else None
    return check


def _file_check(path: Path) -> Callable[[], str | None]:
    return lambda: None if path.exists() else f"wrote no {path.name}"


def stages(out: Path, layers: int, missing: list[str]) -> list[Stage]:
    py, probes = sys.executable, str(ROOT / "tools" / "gpu_probes.py")
    junit = out / "cuda-tests.xml"
    # -k cuda: in those files, the tests with a CUDA path (the CPU ones there are covered by CI)
    plan = [Stage("install", [py, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS),
                              *(REQUIREMENTS[m] for m in missing)], 120, cuda=False),
            Stage("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                                 f"--junitxml={junit}", *cuda_test_files()], 180, check=_tests_check(junit)),
            Stage("server", [py, probes, "serve", str(out / "server.json")], 90),
            Stage("hbm_bandwidth", [py, probes, "bandwidth", str(out / "bandwidth.json")], 60)]
    # cheapest first, INT8 last: its Triton kernels compile for every weight shape and decode batch size
    # (INT4 compiles too where torch's int4 kernel fails its check)
    for precision, quant, timeout in (("fp16", "none", 90), ("int4", "int4", 120), ("int8", "int8", 150)):
        result = out / f"bench_{precision}.json"
        plan.append(Stage(f"bench_{precision}", [
            py, str(ROOT / "tools" / "bench.py"), "--preset", PRESET, "--layers", str(layers), "--simulate-tp",
            str(TP), "--device", "cuda", "--dtype", "fp16", "--quant", quant, "--prefill", "512",
            "--batches", "1,8,64", "--steps", "16", "--runs", "3", "--json", str(result)], timeout,
            check=_file_check(result)))
    return plan


def clear_results(out: Path) -> None:
    """A reused --out folder must not lend a stage that failed this time the results of an earlier run."""
    for name in ("environment.json", "bandwidth.json", "server.json", "cuda-tests.xml", "report.json", "report.md",
                 *(f"{n}.json" for n in STAGE_NAMES if n.startswith("bench_"))):
        (out / name).unlink(missing_ok=True)


def probe_environment(out: Path, logs: Path, deadline: float) -> tuple[Outcome, dict]:
    """The environment stage: what the machine has (a stage like the others, so it is bounded too)."""
    result = out / "environment.json"
    stage = Stage("environment", [sys.executable, str(ROOT / "tools" / "gpu_probes.py"), "environment",
                                  str(result), *REQUIREMENTS], 60, cuda=False)
    outcome = run_stage(stage, logs, min(stage.timeout_s, deadline - time.monotonic()))
    info = gpu_report.read_json(result) or {"cuda": False, "missing": list(REQUIREMENTS)}
    outcome.detail = info.get("device") or "no CUDA device"
    return outcome, info


def skip_rule(info: dict, dry_run: bool, missing: list[str], selected: set[str]) -> Callable[[Stage], str | None]:
    def skip(stage: Stage) -> str | None:
        if stage.name not in selected:
            return "not selected (--stages)"
        if stage.name == "install":
            if not missing:
                return "nothing missing"
            if dry_run:
                return "dry run"
            if not WHEELS.is_dir():
                return f"no {WHEELS.name}/ here: make it with tools/gpu_wheels.sh where PyPI is reachable"
        if stage.cuda and not info.get("cuda"):
            return "no CUDA"
        if stage.cuda and dry_run:
            return "dry run"
        return None
    return skip


def annotate(outcomes: list[Outcome], out: Path) -> None:
    """Short details for the table, read from the stages' logs and results."""
    for o in outcomes:
        if o.status == "skipped" or o.log is None:
            continue
        text = Path(o.log).read_text(errors="replace")
        if o.name.startswith("bench_") and (m := re.search(r"kernels prepared in ([\d.]+) s", text)):
            o.kernels_prepared_s = float(m.group(1))
            o.detail = f"kernels prepared in {m.group(1)} s"
        elif o.name == "cuda_tests" and (m := re.findall(r"\d+ (?:passed|failed|skipped|deselected|error)", text)):
            o.detail = ", ".join(m)
        elif o.name == "hbm_bandwidth" and (bw := gpu_report.read_json(out / "bandwidth.json")) and "best_gbs" in bw:
            o.detail = f"{bw['best_gbs']:.0f} GB/s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="the folder for report.json, report.md and logs/")
    ap.add_argument("--dry-run", action="store_true", help="run the plumbing only: no install, no CUDA stage")
    ap.add_argument("--layers", type=int, default=8, help=f"layers of {PRESET} the bench simulates (scaled to 70)")
    ap.add_argument("--stages", default=",".join(STAGE_NAMES), help="the stages to run, comma-separated")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the bound on the whole check")
    ap.add_argument("--requirements", action="store_true", help="print what tools/gpu_wheels.sh fetches, then exit")
    args = ap.parse_args(argv)
    if not args.requirements and args.out is None:
        ap.error("--out is required")
    unknown = set(args.stages.split(",")) - set(STAGE_NAMES)
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(STAGE_NAMES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.requirements:
        print("\n".join(REQUIREMENTS.values()))
        return 0
    deadline = started + args.budget_s - REPORT_S
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    clear_results(out)
    first, info = probe_environment(out, logs, deadline)
    missing = [m for m in info.get("missing", []) if m in REQUIREMENTS]
    skip = skip_rule(info, args.dry_run, missing, set(args.stages.split(",")))
    outcomes = [first, *run_all(stages(out, args.layers, missing), logs, deadline, skip)]
    annotate(outcomes, out)
    meta = {"dry_run": args.dry_run, "budget_s": args.budget_s, "preset": PRESET, "tp": TP, "layers": args.layers,
            "environment": info, "wall_s": round(time.monotonic() - started, 1)}
    report = gpu_report.build(meta, [dataclasses.asdict(o) for o in outcomes], out)
    gpu_report.write(report, out)
    for o in outcomes:
        print(f"{o.name:<14} {o.status}{': ' + o.reason if o.reason else ''}")
    print(f"reports: {out / 'report.md'}, {out / 'report.json'}")
    return 1 if any(o.status in ("failed", "timed out") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
