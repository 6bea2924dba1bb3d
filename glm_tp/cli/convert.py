"""`glm-tp-repartition` and `glm-tp-quantize`: rewrite a checkpoint as release-format shards for another
number of ranks, or to INT8/INT4 weight-only. SRC is any layout the loader reads: release shards (any
count), one unsharded .pt/.bin/.safetensors file, or a Hugging Face folder. Both stream one tensor at a
time through checkpoints/reshard.py; no GPU.

    glm-tp-repartition SRC DST --tp 4            # 8 shards -> 4, 1 -> 4, 4 -> 3: any TP size the model divides into
    glm-tp-repartition SRC DST --tp 4 --bits 4   # reshard, then INT4-quantize (as the reference does)
    glm-tp-repartition SRC DST --tp 8 --pp 2 --stage-layers 34,36   # per pipeline stage: DST/<iter>/stage_SS/
    glm-tp-quantize SRC DST --bits 8
    glm-tp-quantize --report glm-130b            # per-rank weight bytes, no checkpoint needed

--pp P writes TP shards per pipeline stage, each holding only that stage's layers (the embedding on the
first, the final norm and the head on the last), and records the split in glm_tp.json: each stage's ranks
then open only their stage's folder, and loading takes the recorded split (pipeline_parallel and stage_layers must match it, or pipeline_parallel=1
reads it as one checkpoint).

Float checkpoints reshard exactly (bit-identical round trips). Quantized input: column-parallel weights
keep their scales (exact); a row-parallel slice that lies within one source shard keeps that shard's
scales (exact), one joined from several shards is dequantized and quantized again, with a warning that
this is lossy;
--bits 0 writes fp16. Quantizing writes what the reference's `convert_tp.py --quantization-bit-width`
writes: an int8 `weight` (INT4: two values per byte) and an fp16 `weight_scale` per output row for the
four linears of every layer; biases, LayerNorms and the embedding stay as they are.
"""
from __future__ import annotations

import argparse
import sys
import time

from glm_tp.checkpoints.release import CheckpointError, recorded_stages
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.checkpoints.sources import open_source, source_bits
from glm_tp.cli.output import plain_warnings, prepare_output
from glm_tp.cli.planner import Plan
from glm_tp.config import ModelConfig, get_preset


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model preset, for checkpoints without glm_tp.json (e.g. glm-130b)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty DST")
    return ap


def _preset(name: str | None) -> ModelConfig | None:
    return get_preset(name) if name else None


def _written(dst: object, what: str, shard_bytes: list[int], seconds: float, staged: bool = False) -> str:
    sizes = ", ".join(f"{b / 1e6:.1f}" for b in shard_bytes)
    return f"wrote {dst}: {what} in {seconds:.1f} s; weight MB per rank{' (stage by stage)' * staged}: {sizes}"


def repartition_main(argv: list[str] | None = None) -> None:
    ap = _parser("glm-tp-repartition")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tp", type=int, required=True, help="number of output shards (ranks)")
    ap.add_argument("--bits", type=int, choices=(0, 4, 8), help="quantize the output (0 = fp16); default: as SRC")
    ap.add_argument("--pp", type=int, default=None, help="pipeline stages to write shards for, each holding only "
                    "its stage's tensors (default 1, or as many as --stage-layers names)")
    ap.add_argument("--stage-layers", type=_sizes,
                    help="layers of each stage, e.g. 34,36 (default: as even as they go)")
    args = ap.parse_args(argv)
    pp = args.pp if args.pp is not None else len(args.stage_layers or [1])
    if not 1 <= pp <= 1024:
        ap.error(f"--pp {pp}: must be a whole number from 1 to 1024")
    try:
        model = _preset(args.model)
        if model is not None:
            model.check_tp(args.tp)
        dst = prepare_output(args.dst, args.force)
        start = time.time()
        with plain_warnings():
            report = rewrite(args.src, dst, args.tp, args.bits, model, pp=pp, stage_sizes=args.stage_layers)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    staged = pp > 1 or bool(args.stage_layers)
    what = f"{args.tp} shard(s)" + f" x {pp} stages" * staged
    print(_written(dst, what, report.shard_bytes, time.time() - start, staged))


def _sizes(text: str) -> list[int]:
    """--stage-layers: whole numbers >= 1, comma-separated (that they match the model is rewrite's check)."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give the layers of each stage as whole numbers >= 1, e.g. 34,36")
    return sizes


def memory_report(preset: str) -> str:
    """Per-rank weight bytes of a preset at each TP size and precision."""
    cfg = get_preset(preset)
    lines = [f"per-rank weight bytes for {preset}:", f"  {'TP':>3} {'fp16':>9} {'int8':>9} {'int4':>9}"]
    for tp in (t for t in (1, 2, 4, 8) if t in cfg.valid_tp_sizes()):
        sizes = [Plan(cfg, tp, 2, bits, 1, 1).weight_bytes / 1e9 for bits in (0, 8, 4)]
        lines.append(f"  {tp:>3} " + " ".join(f"{s:7.2f}GB" for s in sizes))
    return "\n".join(lines)


def quantize_main(argv: list[str] | None = None) -> None:
    ap = _parser("glm-tp-quantize")
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--bits", type=int, choices=(4, 8))
    ap.add_argument("--report", metavar="PRESET", help="print per-rank weight bytes for a preset and exit")
    args = ap.parse_args(argv)
    if args.report:
        try:
            print(memory_report(args.report))
        except ValueError as e:
            sys.exit(f"error: {e}")
        return
    if not (args.src and args.dst and args.bits):
        ap.error("give SRC DST --bits 8|4 (or --report PRESET)")
    try:
        source = open_source(args.src)
        model = _preset(args.model)
        cfg = model or source.model_config()
        held = source_bits(source, cfg.hidden_size if cfg is not None else None)
        if held:
            raise CheckpointError(f"{args.src} is already INT{held}: quantize the fp16 checkpoint instead")
        stages = recorded_stages(source.metadata)  # a source written per stage stays so, with its split
        dst = prepare_output(args.dst, args.force)
        start = time.time()
        with plain_warnings():  # as many shards as the source
            report = rewrite(args.src, dst, source.shards, args.bits, model, pp=len(stages or [1]), stage_sizes=stages)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    what = f"INT{args.bits}, {source.shards} shard(s)" + f" x {len(stages or [])} stages" * bool(stages)
    print(_written(dst, what, report.shard_bytes, time.time() - start, bool(stages)))
