#!/usr/bin/env python
"""GB/s of the native CPU GEMV (glm_tp/kernels/native.py) against the numba kernels (glm_tp/kernels/cpu.py)
and a plain read of the same bytes, per weight shape, INT8 and INT4, thread count and batch size.

    python tools/bench_native.py --rounds 7
    python tools/bench_native.py --shapes 2048x2048 --bits 8 --threads 1 --batches 1 --isa avx2

Each configuration cycles through enough copies of its weight (--pool-mib, default 1024) that every call
reads from memory, not from the last-level cache, as a decode step does. The configurations of one shape run
in alternation, round after round; the figure is the median round (GB/s = weight bytes / time per call).
"Plain read": numpy's sum over the same bytes viewed as int64 (one thread), and torch's sum (the
threads given). Not a test: the machine's load changes the figures (see `uptime`, printed first and last).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import glm_tp  # noqa: E402,F401  (first: it sets the OpenMP wait policy before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from glm_tp.kernels import native  # noqa: E402
from glm_tp.kernels.formats import pack_int4_halves, quantize_rows, unpack_int4  # noqa: E402


def _copies(q: torch.Tensor, scale: torch.Tensor, bits: int, pool_mib: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    count = max(2, (pool_mib << 20) // q.numel())
    return [(q.clone(), scale) for _ in range(count)]


def _kernels(copies, bits: int, isa: str | None) -> dict[str, list]:
    """name -> one callable per copy, each taking (x, threads)."""
    out: dict[str, list] = {}
    if native.available():
        mms = [native.NativeMatmul(q, s, bits, isa) for q, s in copies]
        out[f"native-{isa or native.best_isa()}"] = [lambda x, t, m=m: m(x, threads=t) for m in mms]
    try:
        from glm_tp.kernels import cpu
    except ImportError:
        print("numba not installed: no numba rows", file=sys.stderr)
    else:
        nbs = [cpu.small_kernel(q, s, bits) for q, s in copies]
        out["numba"] = [lambda x, t, m=m: m(x) for m in nbs]
    weights = [m.w for m in mms] if native.available() else [q for q, _ in copies]
    # int64 words: an integer sum runs at read speed (float sums of random bits meet slow denormals)
    arrays = [w.view(torch.int64) for w in weights]
    out["read-numpy"] = [lambda x, t, a=a.numpy(): a.sum() for a in arrays]
    out["read-torch"] = [lambda x, t, a=a: a.sum() for a in arrays]
    return out


def _round(calls: list, x: torch.Tensor, threads: int) -> float:
    """Seconds per call over one pass through the copies."""
    start = time.perf_counter()
    for call in calls:
        call(x, threads)
    return (time.perf_counter() - start) / len(calls)


def bench_shape(n: int, k: int, bits: int, args) -> list[str]:
    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(n, k), bits)
    copies = _copies(q, scale, bits, args.pool_mib)
    kernels = _kernels(copies, bits, args.isa)
    nbytes = q.numel()  # INT4: q is already packed two per byte
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        if "numba" in kernels:
            from glm_tp.kernels import cpu
            cpu.configure_threads()
        for batch in args.batches:
            x = torch.randn(batch, k)
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for name, calls in kernels.items():  # warm-up: numba's first call, the pool's threads
                _round(calls[:2], x, threads)
            for _ in range(args.rounds):
                for name, calls in kernels.items():
                    times[name].append(_round(calls, x, threads))
            cells = [f"{nbytes / statistics.median(times[name]) / 1e9:6.1f}" for name in kernels]
            rows.append(f"| {n}x{k} INT{bits} | {threads} | {batch} | " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    header = "| weight [out x in] | threads | batch | " + " | ".join(kernels) + " |"
    return [header, "|" + "---|" * (3 + len(kernels))] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["11008x2048", "2048x2048"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pool-mib", type=int, default=1024)
    ap.add_argument("--isa", choices=list(native.ISAS), default=None)
    args = ap.parse_args()
    print(native.describe())
    print("load before:", os.getloadavg())
    tables = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for bits in args.bits:
            tables.append(bench_shape(n, k, bits, args))
    print("load after:", os.getloadavg())
    print("\nGB/s of weight bytes read (median of %d alternating rounds)" % args.rounds)
    for i, table in enumerate(tables):
        print("\n".join(table if i == 0 else table[2:]))


if __name__ == "__main__":
    main()
