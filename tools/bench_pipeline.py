"""Pipeline-parallel benchmark on CPU: decode throughput of one model at TP 4, TP 2 x PP 2 and PP 4, and what a
step's communication costs (an all-reduce inside a TP group against a stage-to-stage send of the same hidden
states), on gloo ranks of this machine.

    python tools/bench_pipeline.py                      # a medium random model, batch 1 and 16
    python tools/bench_pipeline.py --layouts 4x1 2x2 1x4 --batches 1 16 --steps 32 --json out.json

A layout is TPxPP. Each run loads the same random checkpoint at that layout, prefills `batch` prompts and times
`steps` decode steps of the whole batch (every rank takes part; rank 0 reports). The communication figures are
the median of 50 calls of each kind with the step's message size ([batch, hidden] in the model's dtype).

`--engine` runs the serving engine instead (engine/lanes.py: with PP > 1, up to one lane per stage in flight
at once): `batch` requests of a 16-token prompt decode a short and a long run, and each stage reports the
share of its wall time spent waiting in receives (activations; rank 0 also the logits) and in the plan
broadcast, the rest being compute. "steady" takes the difference of the two runs (fill and drain cancel
out), "whole" the long run with its fill and drain.
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


def _timed(fn, waits: dict[str, float], key: str):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            waits[key] += time.perf_counter() - start
    return timed


def _serve(tp, ckpt: Path, pp: int, batch: int, steps: int, in_turn: bool) -> list | None:
    """Rank 0: per stage (its TP rank 0) the lanes, steady decode tokens/s and the recv/broadcast shares.
    in_turn: one lane (the stages of a step in turn), the baseline."""
    import glm_tp.engine.core as core
    import glm_tp.engine.lanes as lanes
    import glm_tp.model.glm as glm
    from glm_tp.engine.core import Engine
    from glm_tp.engine.types import GenerationConfig, Request
    from glm_tp.text.tokenizer import IdsOnlyTokenizer

    if in_turn:
        core.lane_count = lambda *args: 1
    waits = {"recv": 0.0, "broadcast": 0.0}
    glm.recv = lanes.recv = _timed(recv, waits, "recv")
    torch.distributed.broadcast = _timed(torch.distributed.broadcast, waits, "broadcast")
    model = load_model(ckpt, tp=tp, pipeline_parallel=pp, progress=False)
    engine = Engine(model, IdsOnlyTokenizer(model.cfg.special), max_batch=batch, cuda_graphs=False)

    def run(n: int) -> tuple[float, float, float]:
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
        requests = [Request(f"r{i}", token_ids=list(range(5 + i, 21 + i)) + [model.cfg.special.gmask], config=config)
                    for i in range(batch)]
        before, start = dict(waits), time.perf_counter()
        engine.generate(requests)
        return time.perf_counter() - start, waits["recv"] - before["recv"], waits["broadcast"] - before["broadcast"]

    run(2)  # warm-up
    short, long = run(steps // 4), run(steps)
    steady = [b - a for a, b in zip(short, long)]
    mine = {"stage": model.stage.index if model.stage else 0, "lanes": len(engine.lanes),
            "tokens_s": batch * (steps - steps // 4) / steady[0],
            "steady_recv": steady[1] / steady[0], "steady_broadcast": steady[2] / steady[0],
            "whole_recv": long[1] / long[0], "whole_broadcast": long[2] / long[0]}
    everyone = model.world.all_gather_object(mine if model.tp.rank == 0 else None)
    return [m for m in everyone if m is not None] if model.world.is_first else None


def _report_decode(ckpt: Path, layouts: list[str], batches: list[int], steps: int, _: bool) -> list[dict]:
    print(f"{'layout':>8} {'batch':>5} {'step ms':>8} {'tokens/s':>9} {'all-reduce us':>14} {'send us':>8}")
    rows = []
    for layout in layouts:
        tp, pp = (int(v) for v in layout.split("x"))
        for batch in batches:
            out = run_ranks(tp * pp, _decode, ckpt, pp, batch, steps, timeout=600)[0]
            rows.append({"layout": layout, "batch": batch, **out})
            fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
            print(f"{layout:>8} {batch:>5} {out['step_ms']:8.1f} {out['tokens_s']:9.1f} "
                  f"{fmt(out['all_reduce_us']):>14} {fmt(out['send_us']):>8}", flush=True)
    return rows


def _report_engine(ckpt: Path, layouts: list[str], batches: list[int], steps: int, in_turn: bool) -> list[dict]:
    print(f"{'layout':>8} {'batch':>5} {'lanes':>5} {'tokens/s':>9}  per stage: recv% / broadcast% of wall, "
          f"steady (whole run)")
    rows = []
    for layout in layouts:
        tp, pp = (int(v) for v in layout.split("x"))
        for batch in batches:
            stages = run_ranks(tp * pp, _serve, ckpt, pp, batch, steps, in_turn, timeout=900)[0]
            rows.append({"layout": layout, "batch": batch, "stages": stages})
            shares = "  ".join(f"s{m['stage']} {100 * m['steady_recv']:.0f}/{100 * m['steady_broadcast']:.0f} "
                               f"({100 * m['whole_recv']:.0f}/{100 * m['whole_broadcast']:.0f})" for m in stages)
            print(f"{layout:>8} {batch:>5} {stages[0]['lanes']:>5} {stages[0]['tokens_s']:9.1f}  {shares}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["4x1", "2x2", "1x4"], help="TPxPP, 4 ranks each")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--engine", action="store_true", help="through the engine's lanes, with the bubble")
    parser.add_argument("--in-turn", action="store_true", help="with --engine: one lane, the stages in turn")
    args = parser.parse_args()
    cfg = dataclasses.replace(PRESETS["tiny"], **MEDIUM)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "medium", cfg, 1, torch.float32)
        print(f"model: {cfg.num_layers} layers x {cfg.hidden_size}, fp32; 4 ranks on this machine, one torch "
              f"thread each", flush=True)
        report = _report_engine if args.engine else _report_decode
        rows = report(ckpt, args.layouts, args.batches, args.steps, args.in_turn)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
