"""Write a random, deterministic checkpoint in the GLM-130B release layout (for tests and benchmarks).

    glm-tp-make-checkpoint DST --preset tiny --tp 2      # or python tools/make_checkpoint.py ...
    glm-tp-make-checkpoint DST --preset glm-130b --layers 2 --tp 8 --dtype fp16

The same --seed gives the same model at every --tp (the full tensors are drawn, then cut). Each full
tensor is drawn once and its pieces are written in place into every shard file, so memory holds one
tensor and the time does not grow with --tp (GLM-130B's shape with 2 layers, --tp 8: a few minutes).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from glm_tp.checkpoints.release import make_metadata, shard_name, write_latest
from glm_tp.checkpoints.reshard import ShardWriter
from glm_tp.checkpoints.slices import gather
from glm_tp.checkpoints.synthetic import random_tensor
from glm_tp.cli.output import prepare_output
from glm_tp.config import ModelConfig, get_preset, parse_dtype
from glm_tp.parallel.partition import copy_plan, full_shapes, layout_of, split


def write_random(dst: Path, cfg: ModelConfig, tp: int, dtype: torch.dtype, seed: int, iteration: str) -> None:
    """The shards of synthetic.random_shard, written tensor by tensor into every shard at once."""
    shapes = full_shapes(cfg)
    specs: list[dict] = [{} for _ in range(tp)]
    for name, shape in shapes.items():  # each rank's piece shapes, from shapes alone
        for rank, piece in enumerate(split(torch.empty(shape, device="meta"), layout_of(name, cfg.glu), tp)):
            specs[rank][name] = (tuple(piece.shape), dtype)
    writers = [ShardWriter(dst / iteration / shard_name(rank), specs[rank]) for rank in range(tp)]
    total = sum(torch.Size(s).numel() for s in shapes.values())
    with tqdm(total=total, desc="writing shards", unit="param", unit_scale=True) as bar:
        for name, shape in shapes.items():
            full = random_tensor(name, shape, seed, cfg.hidden_size, dtype)
            for rank, writer in enumerate(writers):  # the full tensor is the one source of every rank's slice
                plan = copy_plan(layout_of(name, cfg.glu), shape, 1, tp, rank)
                writer.write([name], lambda t, part=full, plan=plan: gather(t[name], [part], plan, mapped=False))
            bar.update(full.numel())
            del full
    for writer in writers:
        writer.close()


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
    write_random(dst, cfg, args.tp, dtype, args.seed, args.iteration)
    write_latest(dst, args.iteration, make_metadata(cfg, args.tp, dtype, seed=args.seed))
    print(f"wrote {dst}: {args.preset} ({cfg.num_layers} layers), tp={args.tp}, {args.dtype}, seed={args.seed}")


if __name__ == "__main__":
    main()
