"""Prefix-caching benchmark: a multi-turn chat workload with and without the prefix cache.

    python tools/bench_prefix.py                                   # 50 conversations x 8 turns
    python tools/bench_prefix.py --conversations 20 --turns 4 --json out.json

The model is ChatGLM2-shaped (RMSNorm pre-LN, SwiGLU, grouped-query attention with 2 KV groups and 128-wide
heads, half rotary, ChatGLM2's vocabulary and special ids) with random weights, fewer and narrower layers
(--layers, --hidden) so that it runs on a few CPU cores. Every conversation starts with the same system
prompt; each turn resends the whole history (every earlier prompt and answer, as chat clients do) plus a
new user message, and the next turn is sent as soon as the answer is complete (closed loop, every
conversation at once). Answers have a fixed length (a random model rarely ends by itself). Reported per
run: prefill tokens computed (prompt tokens minus those copied from the cache), the hit rate, time to first
token p50/p99, the wall time and the process's CPU time (less sensitive than wall time to other work on a
shared machine); every run must give the same tokens, which the report checks. A short
warm-up run first compiles the CPU kernels, so that neither measured run pays for it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def checkpoint(folder: Path, layers: int, hidden: int) -> Path:
    """The random ChatGLM2-shaped checkpoint (release layout, fp32), written once."""
    import torch

    from glm_tp.checkpoints.release import make_metadata, write_latest, write_shard
    from glm_tp.checkpoints.synthetic import random_shard
    from glm_tp.config import PRESETS

    if not (folder / "latest").exists():
        heads = hidden // 128
        cfg = dataclasses.replace(PRESETS["chatglm2-6b"], num_layers=layers, hidden_size=hidden, num_heads=heads,
                                  inner_hidden_size=hidden * 13696 // 4096, max_seq_len=2048)
        write_shard(folder, "1", 0, random_shard(cfg, 1, 0, 0, torch.float32))
        write_latest(folder, "1", make_metadata(cfg, 1, torch.float32))
    return folder


def conversations(count: int, turns: int, system: int, user: tuple[int, int], seed: int = 0) -> list[list[list[int]]]:
    """Each conversation's user messages as token ids (text ids of ChatGLM2's vocabulary), after one shared
    system prompt (the first message of every conversation starts with it)."""
    rng = random.Random(seed)
    head = [rng.randrange(100, 60000) for _ in range(system)]
    out = []
    for _ in range(count):
        msgs = [[rng.randrange(100, 60000) for _ in range(rng.randint(*user))] for _ in range(turns)]
        msgs[0] = head + msgs[0]
        out.append(msgs)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(ckpt: Path, chats: list[list[list[int]]], answer: int, batch: int, max_len: int, cache_tokens: int) -> dict:
    """The workload through one engine; its tokens, TTFTs and prefill figures."""
    import torch

    from glm_tp import load_model
    from glm_tp.engine.coordinator import Coordinator
    from glm_tp.engine.core import Engine
    from glm_tp.engine.types import Delta, Done, GenerationConfig, Request
    from glm_tp.parallel.dist import init_distributed
    from glm_tp.text.tokenizer import IdsOnlyTokenizer

    torch.manual_seed(0)
    model = load_model(ckpt, tp=init_distributed("cpu"), progress=False)
    config = GenerationConfig(max_new_tokens=answer, min_new_tokens=answer)
    engine = Engine(model, IdsOnlyTokenizer(model.cfg.special), config, max_batch=batch, max_len=max_len,
                    prefix_cache_tokens=cache_tokens)
    coordinator = Coordinator(engine.tp, engine)
    prefix = [model.cfg.special.gmask, model.cfg.special.sop]
    history = [list(prefix) for _ in chats]
    turn = [0] * len(chats)
    sent: dict[str, float] = {}
    ttft: list[float] = []
    tokens: dict[str, list[int]] = {}
    ready: list[int] = list(range(len(chats)))

    def listener(event) -> None:
        if isinstance(event, Delta) and event.request_id in sent:
            ttft.append(time.monotonic() - sent.pop(event.request_id))
        elif isinstance(event, Done):
            c = int(event.result.id.split(".")[0])
            tokens[event.result.id] = history[c] = list(event.result.token_ids)
            turn[c] += 1
            if turn[c] < len(chats[c]):
                ready.append(c)

    start, cpu = time.monotonic(), time.process_time()
    while ready or engine.scheduler.busy:
        while ready:
            c = ready.pop(0)
            rid = f"{c}.{turn[c]}"
            sent[rid] = time.monotonic()
            coordinator.submit(Request(rid, token_ids=history[c] + chats[c][turn[c]]), listener, limit=False)
        coordinator.step()
    wall, cpu = time.monotonic() - start, time.process_time() - cpu
    stats = engine.stats()
    return {"prefix_cache_tokens": cache_tokens, "wall_s": wall, "cpu_s": cpu, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "prompt_tokens": stats["prefill_prompt_tokens"],
            "computed_tokens": stats["prefill_prompt_tokens"] - stats["prefix_cache_reused_tokens"],
            "hit_rate": stats["prefix_cache_hit_rate"], "requests": len(tokens), "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=50)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system", type=int, default=48, help="tokens of the shared system prompt")
    p.add_argument("--user", type=int, nargs=2, default=(16, 48), help="tokens of each user message: min max")
    p.add_argument("--answer", type=int, default=16, help="tokens of each answer")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--cache-tokens", type=int, nargs="+", default=None,
                   help="pool sizes to run besides no cache (default: batch x max_len, the run's default)")
    p.add_argument("--rounds", type=int, default=1, help="run every configuration this often, alternating the "
                   "order (the machine's load changes between runs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1, as torchrun sets for each rank; on a shared machine more threads wait on each other)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    chats = conversations(args.conversations, args.turns, args.system, tuple(args.user))
    sizes = args.cache_tokens or [args.batch * args.max_len]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(Path(tmp) / "chatglm2-shaped", args.layers, args.hidden)
        run(ckpt, [c[:2] for c in chats[:2]], 4, args.batch, args.max_len, sizes[0])  # warm-up: kernels compiled
        configs = [0, *sizes]
        runs = [run(ckpt, chats, args.answer, args.batch, args.max_len, tokens) for i in range(args.rounds)
                for tokens in (configs if i % 2 == 0 else configs[::-1])]
    same = all(r["tokens"] == runs[0]["tokens"] for r in runs[1:])
    print(f"{args.conversations} conversations x {args.turns} turns, system prompt {args.system}, user "
          f"{args.user[0]}-{args.user[1]}, answers {args.answer} tokens; ChatGLM2-shaped, {args.layers} layers x "
          f"{args.hidden}; batch {args.batch}, max_len {args.max_len}; {args.threads} thread(s)")
    print(f"{'prefix cache':>14} {'prompt tok':>11} {'computed':>9} {'hit rate':>9} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'wall':>8} {'CPU':>8}")
    for r in runs:
        print(f"{r['prefix_cache_tokens']:>14} {r['prompt_tokens']:>11} {r['computed_tokens']:>9} "
              f"{r['hit_rate']:>9.1%} {r['ttft_p50_s']:>8.3f}s {r['ttft_p99_s']:>8.3f}s {r['wall_s']:>7.1f}s {r['cpu_s']:>7.1f}s")
    print(f"same tokens with and without the cache: {same}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "same_tokens": same,
                                         "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]},
                                        indent=1))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
