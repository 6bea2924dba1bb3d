#!/usr/bin/env python
"""Write a random, deterministic checkpoint in the GLM-130B release layout (for tests and benchmarks).

    python tools/make_checkpoint.py DST --preset tiny --tp 2
    python tools/make_checkpoint.py DST --preset glm-130b --layers 2 --tp 8 --dtype fp16

The same --seed gives the same model at every --tp (the full tensors are drawn, then cut).
"""
from __future__ import annotations

import argparse

from _common import prepare_output
from tqdm import tqdm

from glm_tp.checkpoint import make_metadata, write_latest, write_shard
from glm_tp.config import get_preset, parse_dtype
from glm_tp.synthetic import random_shard


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--layers", type=int, help="override the preset's layer count (same width)")
    ap.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iteration", default="1")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    args = ap.parse_args(argv)

    cfg = get_preset(args.preset)
    cfg = cfg.with_layers(args.layers) if args.layers else cfg
    try:
        cfg.check_tp(args.tp)
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        ap.error(str(e))
    dst = prepare_output(args.dst, args.force)
    for rank in tqdm(range(args.tp), desc="writing shards", unit="shard"):
        write_shard(dst, args.iteration, rank, random_shard(cfg, args.tp, rank, args.seed, dtype))
    write_latest(dst, args.iteration, make_metadata(cfg, args.tp, dtype, seed=args.seed))
    print(f"wrote {dst}: {args.preset} ({cfg.num_layers} layers), tp={args.tp}, {args.dtype}, seed={args.seed}")


if __name__ == "__main__":
    main()
