"""Serving benchmark: one workload through the round-based engine and the continuous-batching one, side by side.

    python tools/bench_serving.py                       # demo model and a medium random model, 200 requests
    python tools/bench_serving.py --models demo --requests 50 --json out.json

The round-based engine is the code of an earlier commit (--baseline-ref, default: the last commit before
continuous batching), extracted with `git archive` into a temporary folder and run in its own process with
the same workload, as its batch runner fed it: `batch_size` requests per `generate` call, each call
returning when its slowest request ends (and running requests with different settings in separate
rounds, its rule). The current engine gets every request at t=0 through `Coordinator.submit` and steps
until all are answered. By default every request has the same settings, so answer lengths vary only by
content (the demo model's answers; a random model rarely ends by itself); with --mixed-caps each request
has its own max_new_tokens, as a server's clients send. Both engines generate the same tokens, which the
report checks. Reported: tokens/s, requests/s, per-request latency p50/p99 (and time to first token for
the continuous engine, which streams).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REF = "0376be6"  # the round-based engine: the last commit before continuous batching
DEMO = ROOT / "glm_tp" / "demo"
MEDIUM = dict(num_layers=8, hidden_size=1024, num_heads=16, inner_hidden_size=2560, max_seq_len=512)


def workload(count: int, seed: int = 0) -> list[str]:
    """Mixed prompt lengths and content: three quarters held-out demo prompts of every kind ([MASK],
    [gMASK], two blanks; answers of 1 to ~8 tokens) and one quarter open-ended continuations ([gMASK] after
    a few months, days or digits), which the demo model runs on for 8 to 48 tokens; shuffled."""
    sys.path.insert(0, str(ROOT))
    from glm_tp.dev.demo_corpus import DAYS, DIGITS, MONTHS, TASKS, held_out

    rng = random.Random(seed)
    open_ended = count // 4
    per_kind = -(-(count - open_ended) // len(TASKS))
    prompts = [e.prompt for kind in TASKS for e in held_out(kind, per_kind)][:count - open_ended]
    for _ in range(open_ended):
        name, words = rng.choice([("months", MONTHS), ("days", DAYS), ("digits", DIGITS)])
        start = rng.randrange(len(words))
        prompts.append(f"{name} : {' '.join(words[start:start + rng.randint(1, 4)])} [gMASK]")
    rng.shuffle(prompts)
    return prompts


def medium_checkpoint(folder: Path, shape: dict | None = None, dtype: str = "float32") -> Path:
    """A random model with the demo's tokenizer and special ids and a medium shape (`shape` overrides
    MEDIUM's fields; a vocabulary past the demo's is generated only at its text ids), written once."""
    import dataclasses

    import torch

    from glm_tp.checkpoints.release import (
        inspect,
        make_metadata,
        write_latest,
        write_shard,
    )
    from glm_tp.checkpoints.synthetic import random_shard

    if (folder / "latest").exists():
        return folder
    cfg = dataclasses.replace(inspect(DEMO).model_config(), **(shape or MEDIUM))
    write_shard(folder, "1", 0, random_shard(cfg, 1, 0, 0, getattr(torch, dtype)))
    meta = make_metadata(cfg, 1, getattr(torch, dtype), tokenizer="tokenizer.model", tokenizer_offset=0)
    write_latest(folder, "1", meta)
    (folder / "tokenizer.model").write_bytes((DEMO / "tokenizer.model").read_bytes())
    return folder


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def answer_caps(count: int, top: int, seed: int = 1) -> list[int]:
    """Per-request max_new_tokens as clients of a server send them: 4 to `top`, short ones most often."""
    rng = random.Random(seed)
    return [min(top, rng.choice([4, 4, 8, 8, 16, 32, 48])) for _ in range(count)]


def run_one(ckpt: str, prompts: list[str], max_batch: int, max_new_tokens: int, caps: list[int] | None) -> dict:
    """In this process, with whichever glm_tp is on the path: round-based or continuous."""
    import torch

    from glm_tp import load_model
    from glm_tp.text.tokenizer import load_tokenizer
    try:
        from glm_tp.engine.core import Engine
        from glm_tp.engine.types import Delta, Done, GenerationConfig, Request
        continuous = True
    except ImportError:
        from glm_tp.generation import Engine, GenerationConfig, Request
        continuous = False
    torch.manual_seed(0)
    model = load_model(ckpt, progress=False)
    tok = load_tokenizer(Path(ckpt) / "tokenizer.model", model.cfg.special, 0)
    engine = Engine(model, tok, GenerationConfig(max_new_tokens=max_new_tokens), max_batch=max_batch)
    requests = [Request(str(i), p, config=GenerationConfig(max_new_tokens=caps[i]) if caps else None)
                for i, p in enumerate(prompts)]
    engine.generate(requests[:max_batch])  # warm-up
    start = time.perf_counter()
    finished, first_token = {}, {}
    if continuous:
        from glm_tp.engine.coordinator import Coordinator

        coordinator = Coordinator(engine.tp, engine, max_waiting=len(requests))

        def listener(event, rid):
            now = time.perf_counter() - start
            if isinstance(event, Delta):
                first_token.setdefault(rid, now)
            elif isinstance(event, Done):
                finished[rid] = (now, event.result)

        handles = [coordinator.submit(r, lambda e, rid=r.id: listener(e, rid)) for r in requests]
        if hasattr(coordinator, "run"):
            coordinator.run(lambda: all(h.done for h in handles))
        else:  # a checkout from before the one engine loop
            while not all(h.done for h in handles):
                coordinator.step()
    else:
        for i in range(0, len(requests), max_batch):
            results = engine.generate(requests[i:i + max_batch])
            now = time.perf_counter() - start
            finished.update({r.id: (now, r) for r in results})
    seconds = time.perf_counter() - start
    results = [finished[r.id][1] for r in requests]
    latency = [finished[r.id][0] for r in requests]
    tokens = sum(r.completion_tokens for r in results)
    out = {"engine": "continuous" if continuous else "rounds", "seconds": seconds, "tokens": tokens,
           "tokens_per_s": tokens / seconds, "requests_per_s": len(requests) / seconds,
           "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
           "answers": [r.token_ids for r in results]}
    if first_token:
        ttft = list(first_token.values())
        out.update(ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99))
    return out


def baseline_tree(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref, "glm_tp"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_in_subprocess(package_root: Path, ckpt: Path, prompts: list[str], args) -> dict:
    caps = answer_caps(len(prompts), args.max_new_tokens) if args.mixed_caps else None
    spec = json.dumps({"ckpt": str(ckpt), "prompts": prompts, "max_batch": args.batch_size,
                       "max_new_tokens": args.max_new_tokens, "caps": caps})
    env = dict(os.environ, PYTHONPATH=str(package_root))
    done = subprocess.run([sys.executable, __file__, "--worker"], input=spec, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the benchmark run under {package_root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,medium", help="comma-separated: demo, medium")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--mixed-caps", action="store_true",
                    help="each request its own max_new_tokens (4 to --max-new-tokens), as a server's clients send")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the round-based engine")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(run_one(spec["ckpt"], spec["prompts"], spec["max_batch"], spec["max_new_tokens"],
                                 spec["caps"])))
        return
    sys.path.insert(0, str(ROOT))
    prompts = workload(args.requests)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_tree(args.baseline_ref, Path(tmp) / "baseline")
        for name in args.models.split(","):
            ckpt = DEMO if name == "demo" else medium_checkpoint(Path(tmp) / "medium")
            print(f"[{name}] {len(prompts)} requests, batch_size {args.batch_size}: round-based engine ...", flush=True)
            rounds = run_in_subprocess(old, ckpt, prompts, args)
            print(f"[{name}] continuous batching ...", flush=True)
            cont = run_in_subprocess(ROOT, ckpt, prompts, args)
            same = sum(a == b for a, b in zip(rounds.pop("answers"), cont.pop("answers")))
            report[name] = {"rounds": rounds, "continuous": cont, "same_answers": same,
                            "throughput_ratio": cont["tokens_per_s"] / rounds["tokens_per_s"]}
            print_table(name, report[name], len(prompts))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def print_table(name: str, r: dict, count: int) -> None:
    print(f"\n{name}: {count} requests, identical answers: {r['same_answers']}/{count}")
    print("| engine | tokens | s | tokens/s | requests/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in ("rounds", "continuous"):
        e = r[key]
        ttft = (f"{e['ttft_p50_s']:.2f} s | {e['ttft_p99_s']:.2f} s" if "ttft_p50_s" in e else "— | —")
        print(f"| {key} | {e['tokens']} | {e['seconds']:.1f} | {e['tokens_per_s']:.1f} | {e['requests_per_s']:.2f} | "
              f"{e['latency_p50_s']:.2f} s | {e['latency_p99_s']:.2f} s | {ttft} |")
    print(f"throughput: {r['throughput_ratio']:.2f}x the round-based engine\n", flush=True)


if __name__ == "__main__":
    main()
