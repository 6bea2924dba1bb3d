"""Load generator for the OpenAI-compatible server: requests/s, tokens/s, time to first token and inter-token
latency (p50/p99) at several concurrency levels, with streamed completions.

    python -m glm_tp.generate input=http server.port=8000 batch_size=32 &       # the bundled demo model
    python tools/loadgen.py --url http://127.0.0.1:8000 --concurrency 1 8 32 --requests 64

    python tools/loadgen.py --write-medium /tmp/medium                          # a ~97M-parameter random model
    python -m glm_tp.generate input=http checkpoint=/tmp/medium batch_size=32 &

Each client sends its next request, on a new connection, as soon as its last one ended. Prompts are the
demo model's held-out prompts (their words are in its tokenizer); `--min-tokens` forces every answer to
`--max-tokens` tokens so runs compare. Inter-token latency is the gap between streamed chunks that carry
text. `drive` is the client loop for any OpenAI-compatible server (tools/serve_vs_llamacpp.py runs it against
llama-server too).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_serving import medium_checkpoint, percentile  # noqa: E402  (tools/: the same medium model)

from glm_tp.dev.demo_corpus import held_out  # noqa: E402


@dataclass
class Sample:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0          # usage.completion_tokens, else the chunks that carried text
    prompt_tokens: int = 0   # usage.prompt_tokens (0: the server sent no usage)
    chunks: int = 0          # streamed chunks that carried text


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    start = time.perf_counter()
    sample, last = None, start
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            now = time.perf_counter()
            usage = event.get("usage")
            if usage:
                sample = sample or Sample(now - start)
                sample.tokens, sample.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
            texts = [c for c in event.get("choices") or [] if c.get("text")]
            if not texts:
                continue
            if sample is None:
                sample = Sample(now - start)
            else:
                sample.gaps.append(now - last)
            sample.chunks += 1
            last = now
    assert sample is not None, "the stream carried no text"
    sample.tokens = sample.tokens or sample.chunks
    return sample


async def drive(url: str, body: Callable[[int], dict], concurrency: int, total: int) -> dict:
    """`total` streamed completions body(0..total-1) to url/v1/completions from `concurrency` clients, each
    sending its next request when its last one ended: the level's figures."""
    counter = iter(range(total))
    samples: list[Sample] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            samples.append(await one_request(client, url + "/v1/completions", body(i)))

    start = time.perf_counter()
    # a new connection per request: a kept-alive one that the server closes while idle (llama-server's
    # keep-alive timeout) ends the next request sent on it with "Server disconnected"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ttft = [s.ttft for s in samples]
    itl = [g for s in samples for g in s.gaps]
    return {"concurrency": concurrency, "requests": len(samples), "seconds": elapsed,
            "requests_s": len(samples) / elapsed, "tokens_s": sum(s.tokens for s in samples) / elapsed,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "itl_mean": sum(itl) / len(itl) if itl else float("nan"),
            "completion_tokens": sorted({s.tokens for s in samples}),
            "prompt_tokens": sorted({s.prompt_tokens for s in samples})}


async def run_level(url: str, model: str, concurrency: int, total: int, max_tokens: int, min_tokens: int) -> dict:
    prompts = [e.prompt for kind in ("recall", "cycle", "repeat") for e in held_out(kind, 20)]

    def body(i: int) -> dict:
        return {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "glm": {"min_new_tokens": min_tokens}}
    return await drive(url, body, concurrency, total)


def table(rows: list[dict]) -> str:
    lines = ["| concurrency | requests | req/s | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['requests_s']:.2f} | {r['tokens_s']:.1f} | "
                     f"{ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {ms(r['itl_p50'])} | {ms(r['itl_p99'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--write-medium", type=Path, metavar="DST", help="write the medium random model and exit")
    args = parser.parse_args()
    if args.write_medium:
        medium_checkpoint(args.write_medium)
        print(f"wrote {args.write_medium}: the medium random model of tools/bench_serving.py")
        return
    model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    rows = []
    for c in args.concurrency:
        rows.append(asyncio.run(run_level(args.url, model, c, max(args.requests, c), args.max_tokens, args.min_tokens)))
        print(f"concurrency {c}: {rows[-1]['requests_s']:.2f} req/s, {rows[-1]['tokens_s']:.1f} tokens/s", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
