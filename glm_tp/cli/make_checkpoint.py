"""Write a random, deterministic checkpoint (for tests, benchmarks and trying the loaders).

    glm-tp-make-checkpoint DST --preset tiny --tp 2      # or python tools/make_checkpoint.py ...
    glm-tp-make-checkpoint DST --preset glm-130b --layers 2 --tp 8 --dtype fp16
    glm-tp-make-checkpoint DST --preset tiny-chatglm --layout hf --files 2

--layout release (the default): the GLM-130B release layout, --tp shards and glm_tp.json. --layout hf: the
Hugging Face layout of ChatGLM-6B as a clone holds it (config.json, model.safetensors or --files N
safetensors files with model.safetensors.index.json, whole tensors under the clone's names), for presets of
ChatGLM-6B's architecture (tiny-chatglm, chatglm-6b): it loads through the same path as a real clone.

The same --seed gives the same model at every --tp and in both layouts (the full tensors are drawn, then
cut). Each full tensor is drawn once and its pieces are written in place into every shard file, so memory
holds one tensor and the time does not grow with --tp (GLM-130B's shape with 2 layers, --tp 8: a few
minutes); the Hugging Face layout holds one weight file's tensors at a time.

Models with a vocabulary under 20000 ids (tiny, tiny-chatglm, demo) come with the demo model's tokenizer
(tokenizer.model; ice_text.model in the Hugging Face layout), so glm-tp-generate takes text prompts: its 104
pieces are ids 0-103, the text ids such a model generates. Larger shapes are meant for a real tokenizer
(tokenizer=).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from glm_tp.checkpoints.hf import config_model, hf_config, write_hf_layout
from glm_tp.checkpoints.release import make_metadata, shard_name, write_latest
from glm_tp.checkpoints.reshard import ShardWriter
from glm_tp.checkpoints.slices import gather
from glm_tp.checkpoints.synthetic import random_tensor
from glm_tp.cli.output import prepare_output
from glm_tp.cli.settings import DEMO
from glm_tp.config import ModelConfig, get_preset, parse_dtype
from glm_tp.parallel.partition import copy_plan, full_shapes, layout_for, split
from glm_tp.text.tokenizer import ICETK_TEXT_OFFSET, load_tokenizer

DEMO_TOKENIZER = DEMO / "tokenizer.model"


def write_random(dst: Path, cfg: ModelConfig, tp: int, dtype: torch.dtype, seed: int, iteration: str) -> None:
    """The shards of synthetic.random_shard, written tensor by tensor into every shard at once."""
    shapes = full_shapes(cfg)
    specs: list[dict] = [{} for _ in range(tp)]
    for name, shape in shapes.items():  # each rank's piece shapes, from shapes alone
        for rank, piece in enumerate(split(torch.empty(shape, device="meta"), layout_for(name, cfg), tp)):
            specs[rank][name] = (tuple(piece.shape), dtype)
    writers = [ShardWriter(dst / iteration / shard_name(rank), specs[rank]) for rank in range(tp)]
    total = sum(torch.Size(s).numel() for s in shapes.values())
    with tqdm(total=total, desc="writing shards", unit="param", unit_scale=True) as bar:
        for name, shape in shapes.items():
            full = random_tensor(name, shape, seed, cfg.hidden_size, dtype)
            for rank, writer in enumerate(writers):  # the full tensor is the one source of every rank's slice
                plan = copy_plan(layout_for(name, cfg), shape, 1, tp, rank)
                writer.write([name], lambda t, part=full, plan=plan: gather(t[name], [part], plan, mapped=False))
            bar.update(full.numel())
            del full
    for writer in writers:
        writer.close()


def write_random_hf(dst: Path, cfg: ModelConfig, dtype: torch.dtype, seed: int, files: int) -> None:
    """The same full tensors as write_random's, in the Hugging Face layout (`files` safetensors files)."""
    shapes = full_shapes(cfg)
    with tqdm(total=sum(torch.Size(s).numel() for s in shapes.values()), desc="writing weight files",
              unit="param", unit_scale=True) as bar:
        def draw(names: list[str]) -> dict[str, torch.Tensor]:
            out = {n: random_tensor(n, shapes[n], seed, cfg.hidden_size, dtype) for n in names}
            bar.update(sum(t.numel() for t in out.values()))
            return out
        write_hf_layout(dst, cfg, list(shapes), draw, dtype, files)


def bundled_tokenizer(cfg: ModelConfig) -> Path | None:
    """The demo model's tokenizer, for a model too small for a real one (a vocabulary under icetk's 20000 image
    ids) whose control ids all lie above its pieces; None otherwise."""
    if cfg.vocab_size >= ICETK_TEXT_OFFSET:
        return None
    pieces = load_tokenizer(DEMO_TOKENIZER).text_vocab_size
    s = cfg.special
    return DEMO_TOKENIZER if min(s.mask, s.gmask, s.smask, s.sop, s.eop) >= pieces else None


def model_for(args: argparse.Namespace) -> ModelConfig:
    """The preset, with --layers, checked against the layout; ValueError says what to change."""
    cfg = get_preset(args.preset)
    if args.layout == "release":
        if args.files is not None:
            raise ValueError("--files is for --layout hf (the release layout has one file per --tp shard)")
        cfg = cfg.with_layers(args.layers) if args.layers else cfg
        cfg.check_tp(args.tp)
        return cfg
    if args.tp != 1:
        raise ValueError("the Hugging Face layout holds whole tensors (it loads at any TP size): drop --tp, or "
                         "split it into files with --files N")
    if args.layers:  # config.json has no other depth to keep: a model of that many layers
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    if config_model(hf_config(cfg), 0) != cfg:  # what the loader will read back must be this model
        raise ValueError(f"the Hugging Face layout is ChatGLM-6B's (2D positions, GeLU MLP, untied LM head, its "
                         f"chat format and ids) and {args.preset} is not: use --preset tiny-chatglm or chatglm-6b, "
                         f"or --layout release")
    if not 1 <= (args.files or 1) <= len(full_shapes(cfg)):
        raise ValueError(f"--files must be between 1 and {len(full_shapes(cfg))} (the number of tensors)")
    return cfg


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layout", choices=("release", "hf"), default="release",
                    help="release: GLM-130B's shards; hf: a Hugging Face ChatGLM-6B folder")
    ap.add_argument("--tp", type=int, default=1, help="shards of the release layout")
    ap.add_argument("--files", type=int, help="safetensors files of the hf layout (default 1)")
    ap.add_argument("--layers", type=int, help="override the preset's layer count (same width)")
    ap.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iteration", default="1")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        cfg = model_for(args)
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        ap.error(str(e))
    dst = prepare_output(args.dst, args.force)
    tokenizer = bundled_tokenizer(cfg)
    if args.layout == "hf":
        write_random_hf(dst, cfg, dtype, args.seed, args.files or 1)
        if tokenizer:
            shutil.copy(tokenizer, dst / "ice_text.model")  # where a clone keeps it (hf.config_metadata)
        where = f"Hugging Face layout, {args.files or 1} file(s)"
    else:
        write_random(dst, cfg, args.tp, dtype, args.seed, args.iteration)
        extra = {"tokenizer": tokenizer.name, "tokenizer_offset": 0} if tokenizer else {}
        if tokenizer:  # before write_latest, which records its size and SHA-256
            shutil.copy(tokenizer, dst / tokenizer.name)
        write_latest(dst, args.iteration, make_metadata(cfg, args.tp, dtype, seed=args.seed, **extra))
        where = f"tp={args.tp}"
    print(f"wrote {dst}: {args.preset} ({cfg.num_layers} layers), {where}, {args.dtype}, seed={args.seed}"
          f"{', with the demo tokenizer' if tokenizer else ''}")


if __name__ == "__main__":
    main()
