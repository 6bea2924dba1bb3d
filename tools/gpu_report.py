"""tools/gpu_check.py's reports: the stages' outcomes and the results their JSON files hold, as
report.json (everything) and report.md (the tables to read first)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# bench results are scaled from the simulated layers to the whole model: a batch-1 decode step reads every
# weight once, so at the same bytes/s its time grows with the bytes it reads (the projection assumes the
# step stays bandwidth-bound, true at small batches; at batch 64 it is an estimate)
FULL_LAYERS = 70


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_junit(path: Path) -> list[dict]:
    """Each test of a pytest --junitxml file: its id, outcome and the message of a skip or failure."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"skipped": "skipped"}.get(tag, "failed"), found.get("message", "")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "s": float(case.get("time", 0)), "message": message[:300]})
    return tests


def model_scaling(preset: str, tp: int, layers: int, bits: int) -> tuple[float, int]:
    """(full model's decode read bytes / the simulated layers', KV bytes per token and layer of a rank) from
    the planner's own accounting (imported only here: it needs torch, which the GPU machine has)."""
    import dataclasses

    from glm_tp.cli.planner import Plan
    from glm_tp.config import get_preset

    base = get_preset(preset)
    plans = [Plan(dataclasses.replace(base, num_layers=n), tp, 2, bits, 1, 1) for n in (FULL_LAYERS, layers)]
    return plans[0].weight_bytes / plans[1].weight_bytes, 2 * base.hidden_size // tp * 2  # K and V, fp16


def scale_decode(bench: dict, copy_gbs: float | None, weight_ratio: float, kv_token_layer_bytes: int) -> dict:
    """Per batch: the measured ms/step and the bytes/s it read (weights + KV cache), its ratio to the
    copy bandwidth, and the step projected to FULL_LAYERS layers."""
    layers, context = bench["layers"], bench["context"]
    rows = {}
    for batch, stats in bench["decode_ms_per_step"].items():
        kv = int(batch) * (context + 1) * kv_token_layer_bytes
        read = bench["read_bytes_per_step"] + kv * layers
        full = bench["read_bytes_per_step"] * weight_ratio + kv * FULL_LAYERS
        ms = stats["median"]
        ms_full = ms * full / read
        rows[str(batch)] = {"ms_per_step": ms, "read_gbs": read / ms / 1e6,
                            "of_copy_bandwidth": read / ms / 1e6 / copy_gbs if copy_gbs else None,
                            "full_ms_per_step": ms_full, "full_tokens_per_s": int(batch) * 1e3 / ms_full}
    prefill = {str(n): {"ms": s["median"], "full_ms": s["median"] * FULL_LAYERS / layers}
               for n, s in bench["prefill_ms"].items()}
    return {"layers": layers, "full_layers": FULL_LAYERS, "context": context, "decode": rows, "prefill": prefill,
            "bench_read_gbs": bench.get("read_bandwidth_gbs"), "label": bench.get("label")}


def build(meta: dict, outcomes: list[dict], out: Path) -> dict:
    """report.json's content: the run, each stage, and what the result files of the stages hold."""
    report = {**meta, "stages": outcomes, "results": {}}
    results = report["results"]
    copy = read_json(out / "bandwidth.json") or {}
    results["hbm_bandwidth"] = copy or None
    results["cuda_tests"] = read_junit(out / "cuda-tests.xml") or None
    results["server"] = read_json(out / "server.json")
    for o in outcomes:
        bench = read_json(out / f"{o['name']}.json") if o["name"].startswith("bench_") else None
        if not bench:
            continue
        try:
            bits = {"none": 0, "int8": 8, "int4": 4}[bench["quant"]]
            ratio, kv = model_scaling(meta["preset"], meta["tp"], bench["layers"], bits)
            results[o["name"]] = scale_decode(bench, copy.get("best_gbs"), ratio, kv)
        except Exception as e:  # the raw bench JSON stays in the folder; the report says why it is not here
            results[o["name"]] = {"error": f"{type(e).__name__}: {e}"}
        results[o["name"]]["kernels_prepared_s"] = o.get("kernels_prepared_s")
    return report


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def markdown(report: dict) -> str:
    env, results = report.get("environment") or {}, report["results"]
    device = (f"{env.get('device')} (sm {env.get('capability')}, {env.get('memory_gib')} GiB)" if env.get("cuda")
              else "no CUDA device")
    lines = ["# GPU check", "",
             f"{device}; torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), Python {env.get('python')}; "
             f"dry run: {'yes' if report['dry_run'] else 'no'}; {report['wall_s']:.0f} s of the "
             f"{report['budget_s']:.0f} s bound", "",
             "| stage | status | s | detail |", "|---|---|---|---|"]
    for o in report["stages"]:
        status = f"{o['status']}: {o['reason']}" if o["reason"] else o["status"]
        lines.append(f"| {o['name']} | {status} | {o['wall_s']:.1f} | {o.get('detail') or ''} |")
    lines += _tests_section(results.get("cuda_tests"))
    lines += _bench_section(report, results)
    lines += _server_section(results.get("server"))
    return "\n".join(lines) + "\n"


def _tests_section(tests: list[dict] | None) -> list[str]:
    if not tests:
        return []
    lines = ["", "## CUDA tests", "", "| test | outcome | s |", "|---|---|---|"]
    for t in tests:
        outcome = f"{t['outcome']}: {t['message']}" if t["message"] else t["outcome"]
        lines.append(f"| {t['test']} | {outcome.replace('|', '/')} | {t['s']:.1f} |")
    return lines


def _bench_section(report: dict, results: dict) -> list[str]:
    benches = {k[len("bench_"):]: v for k, v in results.items() if k.startswith("bench_") and "decode" in v}
    if not benches:
        return []
    copy = results.get("hbm_bandwidth") or {}
    some = next(iter(benches.values()))
    lines = ["", f"## Decode: {report['preset']}, {some['label']}", "",
             f"HBM bandwidth (1 GiB device-to-device copy): {_fmt(copy.get('best_gbs'), '{:.0f}')} GB/s best, "
             f"{_fmt(copy.get('median_gbs'), '{:.0f}')} GB/s median. Measured on {some['layers']} layers, "
             f"context {some['context']}; '{some['full_layers']} layers' scales each step by the bytes it reads.", "",
             f"| precision | batch | ms/step ({some['layers']} layers) | GB/s read | of the copy bandwidth | "
             f"ms/step ({some['full_layers']} layers, projected) | tokens/s ({some['full_layers']} layers) |",
             "|---|---|---|---|---|---|---|"]
    for precision, r in benches.items():
        for batch, d in r["decode"].items():
            lines.append(f"| {precision} | {batch} | {d['ms_per_step']:.3f} | {d['read_gbs']:.0f} | "
                         f"{_fmt(d['of_copy_bandwidth'], '{:.0%}')} | {d['full_ms_per_step']:.2f} | "
                         f"{d['full_tokens_per_s']:.0f} |")
    lines += ["", "| precision | prefill tokens | ms | ms (full model) | kernels prepared in s |",
              "|---|---|---|---|---|"]
    for precision, r in benches.items():
        prepared = _fmt(r.get("kernels_prepared_s"), "{:.1f}")
        for n, p in r["prefill"].items():
            lines.append(f"| {precision} | {n} | {p['ms']:.1f} | {p['full_ms']:.0f} | {prepared} |")
    return lines


def _server_section(server: dict | None) -> list[str]:
    if not server:
        return []
    error = f"; error: {server['error']}" if "error" in server else ""
    lines = ["", "## Server on CUDA", "", f"listening after {_fmt(server.get('startup_s'), '{:.1f}')} s; "
             f"exit code after SIGTERM: {server.get('exit_code', '-')}{error}"]
    for r in server.get("requests", []):
        answer = f"`{r['text']}`" if "text" in r else f"{r.get('events')} events"
        lines.append(f"- {r['call']}: `{r['prompt']}` -> {answer} "
                     f"({r['s'] * 1e3:.0f} ms; matches: {r.get('matches', '-')})")
    return lines


def write(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
