#!/usr/bin/env python
"""Reshard a release-format checkpoint for another number of ranks (and optionally quantize it).

    python tools/repartition.py SRC DST --tp 4            # 8 shards -> 4 (merge) or 1 -> 4 (split)
    python tools/repartition.py SRC DST --tp 4 --bits 4   # reshard, then INT4-quantize (as the reference does)

Any TP sizes whose ratio is an integer. Streams one parameter at a time: host RAM stays near one
parameter across all shards. Float checkpoints reshard exactly (bit-identical round trips).
Quantized input: column-parallel weights keep their scales (exact); row-parallel weights cut into
pieces keep their source's scales (exact), and joined from several shards are dequantized and quantized
again, with a warning that this is lossy; --bits 0 writes fp16.
No GPU needed.
"""
from __future__ import annotations

import argparse
import sys
import time

import _common  # noqa: F401 - makes glm_tp importable from a source checkout

from glm_tp.checkpoints.release import CheckpointError
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.cli.output import prepare_output
from glm_tp.config import get_preset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tp", type=int, required=True, help="number of output shards (ranks)")
    ap.add_argument("--bits", type=int, choices=(0, 4, 8), help="quantize the output (0 = fp16); default: as SRC")
    ap.add_argument("--model", help="model preset, for checkpoints without glm_tp.json (e.g. glm-130b)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty DST")
    args = ap.parse_args(argv)
    try:
        model = get_preset(args.model) if args.model else None
        if model is not None:
            model.check_tp(args.tp)
        dst = prepare_output(args.dst, args.force)
        start = time.time()
        report = rewrite(args.src, dst, args.tp, args.bits, model)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    sizes = ", ".join(f"{b / 1e6:.1f}" for b in report.shard_bytes)
    print(f"wrote {dst}: {args.tp} shard(s) in {time.time() - start:.1f} s; weight MB per rank: {sizes}")


if __name__ == "__main__":
    main()
