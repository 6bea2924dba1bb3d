#!/usr/bin/env python
"""Quantize a release-format checkpoint offline to INT8 or INT4 (weight-only, per-row absmax).

    python tools/quantize.py SRC DST --bits 8
    python tools/quantize.py --report glm-130b             # per-rank weight bytes, no checkpoint needed

Writes the tensors the reference's `convert_tp.py --quantization-bit-width` writes: int8 `weight`
(INT4: two values per byte) plus an fp16 `weight_scale` for the four linears of every layer; biases,
LayerNorms and the embedding stay as they are. Streams tensor by tensor; no GPU needed.
"""
from __future__ import annotations

import argparse
import sys

import _common  # noqa: F401 - makes glm_tp importable from a source checkout

from glm_tp.checkpoints.release import CheckpointError, inspect
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.cli.output import prepare_output
from glm_tp.cli.planner import Plan
from glm_tp.config import get_preset


def memory_report(preset: str) -> str:
    cfg = get_preset(preset)
    lines = [f"per-rank weight bytes for {preset}:", f"  {'TP':>3} {'fp16':>9} {'int8':>9} {'int4':>9}"]
    for tp in (t for t in (1, 2, 4, 8) if t in cfg.valid_tp_sizes()):
        sizes = [Plan(cfg, tp, 2, bits, 1, 1).weight_bytes / 1e9 for bits in (0, 8, 4)]
        lines.append(f"  {tp:>3} " + " ".join(f"{s:7.2f}GB" for s in sizes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--bits", type=int, choices=(4, 8))
    ap.add_argument("--model", help="model preset, for checkpoints without glm_tp.json (e.g. glm-130b)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty DST")
    ap.add_argument("--report", metavar="PRESET", help="print per-rank weight bytes for a preset and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(memory_report(args.report))
        return
    if not (args.src and args.dst and args.bits):
        ap.error("give SRC DST --bits 8|4 (or --report PRESET)")
    try:
        info = inspect(args.src)
        if info.quant_bits:
            raise CheckpointError(f"{args.src} is already INT{info.quant_bits}: quantize the fp16 checkpoint instead")
        dst = prepare_output(args.dst, args.force)
        report = rewrite(args.src, dst, info.tp, args.bits, get_preset(args.model) if args.model else None)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    sizes = ", ".join(f"{b / 1e6:.1f}" for b in report.shard_bytes)
    print(f"wrote {dst}: INT{args.bits}, {info.tp} shard(s); weight MB per rank: {sizes}")


if __name__ == "__main__":
    main()
