"""Pipeline-parallel benchmark on CPU: decode throughput of one model at TP 4, TP 2 x PP 2 and PP 4, and what a
step's communication costs (an all-reduce inside a TP group against a stage-to-stage send of the same hidden
states), on gloo ranks of this machine.

    python tools/bench_pipeline.py                      # a medium random model, batch 1 and 16
    python tools/bench_pipeline.py --layouts 4x1 2x2 1x4 --batches 1 16 --steps 32 --json out.json

A layout is TPxPP. Each run loads the same random checkpoint at that layout, prefills `batch` prompts and times
`steps` decode steps of the whole batch (every rank takes part; rank 0 reports). The communication figures are
the median of 50 calls of each kind with the step's message size ([batch, hidden] in the model's dtype).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glm_tp import load_model  # noqa: E402
from glm_tp.config import PRESETS  # noqa: E402
from glm_tp.engine.decoder import Decoder  # noqa: E402
from glm_tp.parallel.pipeline import recv, send  # noqa: E402
from tests.support.checkpoints import write_random_checkpoint  # noqa: E402
from tests.support.ranks import run_ranks  # noqa: E402

MEDIUM = dict(num_layers=8, hidden_size=1024, num_heads=16, inner_hidden_size=2560, max_seq_len=512)


def _decode(tp, ckpt: Path, pp: int, batch: int, steps: int) -> dict | None:
    model = load_model(ckpt, tp=tp, pipeline_parallel=pp, progress=False)
    world, h = model.world, model.cfg.hidden_size
    decoder = Decoder(model, max_rows=batch, graphs=False)
    prompt = 16
    with torch.inference_mode():
        decoder.prefill(torch.randint(5, 100, (batch, prompt)), torch.arange(prompt).expand(batch, prompt),
                        torch.zeros(batch, dtype=torch.long), torch.full((batch,), prompt), torch.ones(batch, dtype=torch.long))
        tokens = torch.full((batch,), 7, dtype=torch.long)
        for _ in range(2):  # warm-up
            decoder.step(tokens)
        decoder.restart(batch)
        world.all_gather_object(None)  # start together
        start = time.perf_counter()
        for _ in range(steps):
            decoder.step(tokens)
        elapsed = time.perf_counter() - start
    reduce_us, send_us = _communication(model, batch, h)
    if not world.is_first:
        return None
    return {"step_ms": 1e3 * elapsed / steps, "tokens_s": batch * steps / elapsed, "all_reduce_us": reduce_us,
            "send_us": send_us}


def _communication(model, batch: int, hidden: int) -> tuple[float | None, float | None]:
    """Median µs of one all-reduce inside the TP group and of one stage-to-stage send (to its receipt)."""
    x = torch.zeros(batch, hidden, dtype=model.dtype)
    reduce_us = send_us = None
    if model.tp.communicates:
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            model.tp.all_reduce(x)
            times.append(time.perf_counter() - t0)
        reduce_us = 1e6 * statistics.median(times)
    stage = model.stage
    if stage is not None and stage.split.stages > 1:
        times = []
        for _ in range(50):  # a round trip between the first two stages, halved
            t0 = time.perf_counter()
            if stage.index == 0:
                send(x, stage.next)
                recv(x, stage.next)
            elif stage.index == 1:
                recv(x, stage.previous)
                send(x, stage.previous)
            times.append((time.perf_counter() - t0) / 2)
        send_us = 1e6 * statistics.median(times)
    return reduce_us, send_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["4x1", "2x2", "1x4"], help="TPxPP, 4 ranks each")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = dataclasses.replace(PRESETS["tiny"], **MEDIUM)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "medium", cfg, 1, torch.float32)
        print(f"model: {cfg.num_layers} layers x {cfg.hidden_size}, fp32; 4 ranks on this machine, one torch "
              f"thread each", flush=True)
        print(f"{'layout':>8} {'batch':>5} {'step ms':>8} {'tokens/s':>9} {'all-reduce us':>14} {'send us':>8}")
        for layout in args.layouts:
            tp, pp = (int(v) for v in layout.split("x"))
            for batch in args.batches:
                out = run_ranks(tp * pp, _decode, ckpt, pp, batch, args.steps, timeout=600)[0]
                rows.append({"layout": layout, "batch": batch, **out})
                fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
                print(f"{layout:>8} {batch:>5} {out['step_ms']:8.1f} {out['tokens_s']:9.1f} "
                      f"{fmt(out['all_reduce_us']):>14} {fmt(out['send_us']):>8}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
