"""glm-tp's server against llama.cpp's llama-server on the same machine and byte-matched model, in alternation.

    python tools/serve_vs_llamacpp.py --write-checkpoint DST         # the anchor's medium shape, INT8, once
    python tools/serve_vs_llamacpp.py --checkpoint DST/int8 --llama-server BIN --gguf MODEL.gguf --rounds 3

The model is the CPU anchor's medium shape (8 layers, hidden 2048, 16 heads, gated FFN 5504, vocab 32000, tied
head; random weights): its GGUF comes from the anchor's build script, glm-tp's checkpoint from --write-checkpoint
(the demo tokenizer; the sampler keeps to its text ids, the LM head still reads all 32000 rows). Each round
starts one server at a time (glm-tp's, then llama-server's; the next round the other way round), waits for its
/health, warms it up, runs every --clients level with tools/loadgen.py's client and stops it. Both get --threads
threads and OMP_WAIT_POLICY=PASSIVE and --slots rows. Every request is a streamed /v1/completions of
--prompt-tokens prompt tokens in the server's own tokenizer (checked against usage.prompt_tokens) and exactly
--max-tokens generated ones (glm-tp's glm.min_new_tokens, llama-server's ignore_eos; greedy on both sides);
each prompt starts with its own units, so no prefix cache serves it. The table holds the medians over rounds,
and the ratios are medians of the per-round ratios (glm-tp / llama-server).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (glm_tp importable from a source checkout)
from bench_serving import medium_checkpoint  # noqa: E402
from loadgen import drive  # noqa: E402

ANCHOR_SHAPE = dict(num_layers=8, hidden_size=2048, num_heads=16, inner_hidden_size=5504, vocab_size=32000,
                    max_seq_len=2048)
READY_TIMEOUT_S = 600  # loading and first compiles on a loaded 2-core machine


@dataclass
class Side:
    """One server: how to start it, what its prompts are made of and what its request bodies hold."""

    name: str
    command: Callable[[int], list[str]]
    units: list[str]         # one token each in the server's tokenizer; prompt i: i's units, then filler
    sep: str
    extra: dict               # the body fields that force exactly max_tokens tokens, greedily

    def prompt(self, i: int, count: int) -> str:
        n, head = len(self.units), []
        for _ in range(min(3, count)):  # i in base len(units): a prefix no other request of the run shares
            head.append(self.units[i % n])
            i //= n
        return self.sep.join(head + [self.units[(k * 7) % n] for k in range(count - len(head))])


def sides(args: argparse.Namespace) -> dict[str, Side]:
    from glm_tp.dev.demo_corpus import DIGITS

    def glm(batch: int) -> Callable[[int], list[str]]:
        return lambda port: [sys.executable, "-m", "glm_tp.generate", "input=http", f"server.port={port}",
                             f"checkpoint={args.checkpoint}", "dtype=bf16", f"batch_size={batch}", "max_len=1024",
                             f"server.max_waiting={max(64, max(args.clients))}"]
    llama = lambda port: [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port),  # noqa: E731
                          "-np", str(args.slots), "-c", str(1024 * args.slots), "-t", str(args.threads),
                          "-tb", str(args.threads), "--cont-batching"]
    # the demo tokenizer has single digits and no longer digit pieces; the anchor GGUF's vocabulary holds
    # letters as byte tokens only
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    forced = {"glm": {"min_new_tokens": args.max_tokens}}
    out = {"glm-tp": Side("glm-tp", glm(args.slots), DIGITS, "", forced),
           "llama-server": Side("llama-server", llama, letters, "",  # no slot reuses a prompt's keys
                                {"ignore_eos": True, "temperature": 0, "cache_prompt": False})}
    if args.glm_batch_32:
        out["glm-tp bs32"] = Side("glm-tp bs32", glm(32), DIGITS, "", forced)
    return out


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until GET /health answers 200; the server's exit or READY_TIMEOUT_S ends the wait with its log's tail."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before it was ready:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # a poll interval: readiness is the answer above, not this wait
    proc.terminate()
    raise SystemExit(f"the server was not ready in {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def calibrate(url: str, model: str, side: Side, target: int) -> int:
    """The unit count whose prompts are `target` tokens in this server's tokenizer (usage.prompt_tokens)."""
    seen = {}
    for count in range(1, 4 * target):
        body = {"model": model, "prompt": side.prompt(0, count), "max_tokens": 1}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        seen[count] = got = r.json()["usage"]["prompt_tokens"]
        if got == target:
            return count
        if got > target:
            break
    raise SystemExit(f"{side.name}: no prompt of {target} tokens (units -> tokens: {seen})")


def metric_sum(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram on /metrics; (0, 0) where the server has none."""
    try:
        lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    except httpx.HTTPError:
        return 0.0, 0.0
    value = {k: float(line.split()[-1]) for line in lines for k in ("_sum", "_count")
             if line.startswith(name + k + " ")}
    return value.get("_sum", 0.0), value.get("_count", 0.0)


def run_side(side: Side, args: argparse.Namespace, clients: list[int], log: Path) -> list[dict]:
    """Start the server, run each level, stop it: one row per level."""
    url = f"http://127.0.0.1:{args.port}"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
    with log.open("w") as out:
        proc = subprocess.Popen(side.command(args.port), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, log)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        count = calibrate(url, model, side, args.prompt_tokens)

        def body(i: int, max_tokens: int = args.max_tokens) -> dict:
            return {"model": model, "prompt": side.prompt(i, count), "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, **side.extra}
        asyncio.run(drive(url, lambda i: body(10_000 + i), args.slots, args.slots))  # warm-up: every row count
        rows = []
        for level, c in enumerate(clients):
            before, load = metric_sum(url, "glm_tp_inter_token_latency_seconds"), os.getloadavg()[0]
            row = asyncio.run(drive(url, lambda i, o=level * 1000: body(o + i), c, max(args.min_requests,
                                                                                      args.requests_per_client * c)))
            after = metric_sum(url, "glm_tp_inter_token_latency_seconds")
            row.update(side=side.name, load=load, server_itl_mean=(after[0] - before[0]) / (after[1] - before[1])
                       if after[1] > before[1] else None)
            print(f"  {side.name} {c} clients: {row['tokens_s']:.1f} tok/s, TTFT p50 {row['ttft_p50'] * 1e3:.0f} ms, "
                  f"ITL p50 {row['itl_p50'] * 1e3:.1f} ms, tokens {row['completion_tokens']}, prompt "
                  f"{row['prompt_tokens']}, load {load:.1f}", flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


METRICS = (("TTFT p50", "ttft_p50"), ("TTFT p99", "ttft_p99"), ("ITL p50", "itl_p50"), ("ITL p99", "itl_p99"))


def median_ratio(rounds: list[dict], a: str, b: str, clients: int, key: str) -> float:
    return statistics.median(r[a][clients][key] / r[b][clients][key] for r in rounds if clients in r.get(a, {}))


def table(rounds: list[dict], clients: list[int]) -> str:
    """One row per (glm-tp side, level): medians over rounds, and the median of the per-round ratios."""
    head = "| server | clients | glm-tp tok/s | llama-server tok/s | glm-tp / llama tok/s | " + \
        " | ".join(f"{m} glm-tp / llama (ratio)" for m, _ in METRICS) + " |"
    lines = [head, "|---|---:|---:|---:|---:|" + "---|" * len(METRICS)]
    for name in [n for n in rounds[0] if n != "llama-server"]:
        for c in [c for c in clients if c in rounds[0][name]]:
            med = lambda side, key: statistics.median(r[side][c][key] for r in rounds)  # noqa: E731
            cells = [f"{med(name, k) * 1e3:.0f} / {med('llama-server', k) * 1e3:.0f} ms "
                     f"({median_ratio(rounds, name, 'llama-server', c, k):.2f})" for _, k in METRICS]
            ratio = median_ratio(rounds, name, "llama-server", c, "tokens_s")
            lines.append(f"| {name} | {c} | {med(name, 'tokens_s'):.1f} | {med('llama-server', 'tokens_s'):.1f} | "
                         f"{ratio:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_checkpoint(dst: Path) -> Path:
    """The anchor's medium shape with random weights (bf16), and its INT8 copy by glm-tp-quantize."""
    from glm_tp.cli.convert import quantize_main

    medium_checkpoint(dst / "bf16", ANCHOR_SHAPE, "bfloat16")
    if not (dst / "int8" / "latest").exists():
        quantize_main([str(dst / "bf16"), str(dst / "int8"), "--bits", "8"])
    return dst / "int8"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-checkpoint", type=Path, metavar="DST", help="write DST/bf16 and DST/int8 and exit")
    ap.add_argument("--checkpoint", help="glm-tp's INT8 checkpoint of the anchor's shape")
    ap.add_argument("--llama-server", help="the llama-server binary")
    ap.add_argument("--gguf", help="the byte-matched GGUF (the anchor's q8_0-bf16head.gguf)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=6, help="requests per level at least")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8, help="llama-server -np and glm-tp batch_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--glm-batch-32", action="store_true", help="also glm-tp with batch_size=32, at 32 clients")
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--out", type=Path, default=Path("serve_vs_llamacpp"), help="server logs and results.json")
    return ap


BOUNDS = {"rounds": (1, 100), "requests_per_client": (1, 100), "min_requests": (1, 10_000), "prompt_tokens": (4, 512),
          "max_tokens": (1, 512), "slots": (1, 256), "threads": (1, 1024), "port": (1, 65535)}


def check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each number within its bounds (a prompt and its answer fit glm-tp's max_len=1024 and a slot's 1024)."""
    for name, (lo, hi) in BOUNDS.items():
        if not lo <= getattr(args, name) <= hi:
            ap.error(f"--{name.replace('_', '-')} must be between {lo} and {hi}")
    if not all(1 <= c <= 1024 for c in args.clients):
        ap.error("--clients must each be between 1 and 1024")


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    check(ap, args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the running server is stopped on the way out
    if args.write_checkpoint:
        print(f"wrote {write_checkpoint(args.write_checkpoint)}")
        return
    if not (args.checkpoint and args.llama_server and args.gguf):
        ap.error("give --checkpoint, --llama-server and --gguf (or --write-checkpoint DST)")
    args.out.mkdir(parents=True, exist_ok=True)
    servers, rounds = sides(args), []
    for r in range(args.rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        rounds.append({})
        for name in order:
            levels = [32] if name == "glm-tp bs32" else args.clients
            rows = run_side(servers[name], args, levels, args.out / f"{name.replace(' ', '_')}_r{r + 1}.log")
            rounds[-1][name] = {row["concurrency"]: row for row in rows}
        (args.out / "results.json").write_text(json.dumps(rounds, indent=1, default=str))
    print(table(rounds, args.clients))


if __name__ == "__main__":
    main()
