#!/usr/bin/env python
"""Measure prefill latency, decode ms/token, decode throughput and memory, side by side with the
device's memory bandwidth (and the reference, when SwissArmyTransformer is installed).

    python tools/bench.py --preset glm-130b --layers 4 --dtype bf16 --quant int8 --simulate-tp 8
    torchrun --nproc_per_node 2 tools/bench.py --preset tiny          # real ranks
    python tools/bench.py --hidden 2048 --heads 16 --inner 5504 --layers 8 --dtype bf16 --reference
    python tools/bench.py --preset chatglm2-6b --layers 4 --dtype bf16 --quant int4   # 4 of 28 layers

--simulate-tp N runs exactly what one rank of a TP=N job runs (per-rank shapes, all layers) on this
one device with the collectives turned into no-ops; every output is labelled "single-rank simulation"
and the all-reduce cost is not included. Weights are random (built in memory, no checkpoint). A preset
run with fewer --layers also reports the bytes a step reads at the preset's depth and the step time that
would take at the run's batch-1 read rate.

A run says up front what it measures, then (once the device's bandwidth and matmul peak are known) the least
time its rows can take, and reports each row on stderr as it goes; SIGINT or SIGTERM prints the table of the
rows measured so far and exits 130 or 143.
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import glm_tp  # noqa: E402,F401  (before torch: it sets the OpenMP wait policy, read when torch loads it)
import torch  # noqa: E402

from glm_tp.cli.planner import Plan  # noqa: E402
from glm_tp.config import KERNELS, LM_HEADS, PRESETS, ModelConfig, get_preset, parse_dtype  # noqa: E402
from glm_tp.dev import reference  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
from glm_tp.kernels import native, quant  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
from glm_tp.kernels.formats import quantize_rows  # noqa: E402
from glm_tp.model.glm import GLMModel, SeqLayout  # noqa: E402
from glm_tp.parallel.dist import TPContext, init_distributed, simulated_rank  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import alternated, compare_attention, compare_decode_ops, decode_call, progress, timed  # noqa: E402
from bench_report import (  # noqa: E402
    add_ceilings,
    decode_read_bytes,
    least_seconds,
    plot,
    print_table,
)



def read_bandwidth(device: torch.device, gib: float = 0.5, runs: int = 5) -> float:
    """Bytes/s of a full read (sum) of a buffer much larger than the caches."""
    buf = torch.ones(int(gib * 2 ** 30 / 4), dtype=torch.float32, device=device)
    return buf.numel() * 4 / min(timed(lambda: buf.sum(), device, runs))


def matmul_peak(cfg: ModelConfig, tp: int, device: torch.device, dtype: torch.dtype, bits: int,
                kernels: str = "fused", runs: int = 3) -> float:
    """FLOP/s of the model's widest matmul (h->4h of one rank) on a prefill-sized input, through the kernel
    the model uses (its dtype and layout, or its quantized kernel): the compute ceiling. On CPUs without
    half-precision units this is far below the fp32 peak."""
    rows = 2048 if device.type == "cuda" else 512
    x = torch.randn(rows, cfg.hidden_size, device=device).to(dtype)
    w = torch.randn(2 * cfg.inner_hidden_size // tp, cfg.hidden_size, device=device)
    if bits:
        weight = quant.prepare(*quantize_rows(w, bits), bits, kernels)
        matmul = lambda: weight.matmul(x)  # noqa: E731
    else:
        w = w.to(dtype)
        matmul = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    return 2 * rows * w.shape[0] * w.shape[1] / min(timed(matmul, device, runs))


def allreduce_ms(tp, cfg: ModelConfig, dtype: torch.dtype, runs: int) -> float | None:
    """The all-reduces of one batch-1 decode step (2 per layer, 1 for the embedding), or None when a
    single-rank simulation has no other ranks to talk to."""
    if not tp.communicates:
        return None
    x = torch.zeros(1, 1, cfg.hidden_size, dtype=dtype, device=tp.device)

    def step() -> None:
        for _ in range(2 * cfg.num_layers + 1):
            tp.all_reduce(x)

    return statistics.median(timed(step, tp.device, runs)) * 1e3


def random_model(cfg: ModelConfig, tp, dtype: torch.dtype, bits: int, kernels: str = "fused",
                 lm_head: str = "model") -> GLMModel:
    """Per-rank shapes, random values written in place (fast: no checkpoint, no full-size temporaries)."""
    model = GLMModel(cfg, tp, dtype, tp.device, quant_bits=bits)
    gen = torch.Generator(device=tp.device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dtype == torch.int8:
            p.random_(-7, 8, generator=gen) if bits == 4 else p.random_(-127, 128, generator=gen)
        elif name.endswith("weight_scale"):
            p.fill_(0.01)
        elif "layernorm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02, generator=gen)
    start = time.perf_counter()
    model.prepare_kernels(kernels, lm_head)
    progress(f"kernels prepared in {time.perf_counter() - start:.1f} s (the first load in a fresh environment "
             f"includes compiling the CPU kernels)")
    return model.eval()


def count_bytes(model: GLMModel, plan: Plan, args: argparse.Namespace, result: dict) -> None:
    """The rank's weight bytes and a decode step's read, counted on the model's own tensors (grouped-query
    QKV, SwiGLU and untied heads as they are), and, for a preset run with fewer layers, the same at the
    preset's depth (its layers are alike: each holds what layer 0 holds)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result.update(weight_bytes_per_rank=weights, read_bytes_per_step=decode_read_bytes(plan, args.lm_head, weights))
    depth = get_preset(args.preset).num_layers if args.layers and args.preset in PRESETS else 0
    if depth > model.cfg.num_layers:
        layer = sum(p.numel() * p.element_size() for p in model.transformer.layers[0].parameters())
        result["full_depth"] = {"layers": depth,
                                "read_bytes_per_step": result["read_bytes_per_step"] + (depth - model.cfg.num_layers) * layer}


def kernel_paths(model: GLMModel) -> dict[str, str]:
    """Which kernels a decode step of this model runs (layer 0's choices; every layer makes the same)."""
    block = model.transformer.layers[0]

    def kernel(k) -> str:
        name = type(k).__name__
        if name == "NativeMatmul":
            return f"native GEMV ({native.ISA_NAMES[next(n for n, i in native.ISAS.items() if i == k.isa)]}, Q8_0 activations)"
        return {"DenseMatmul": "native unpack + torch bf16 GEMM", "NativeBF16Matmul": "native bf16 GEMV",
                "Matmul": "numba GEMV"}.get(name, name)

    def linear(layer) -> str:
        p = layer.prepared
        if p is None:
            return "torch matmul"
        small = kernel(p.small) if p.small is not None else p.kind
        return small + ("" if p.kind == "float" else f" ({kernel(p.large) if p.large is not None else p.kind} above 16 rows)")

    mlp = f"{block.mlp.kind} fused into the h->4h GEMV" if block.mlp.fused else f"{block.mlp.kind} torch ops"
    head = model.lm_head or model.transformer.word_embeddings
    attend = block.attention.decode_kernel
    native_attend = attend is not None and attend.func.__module__.endswith("native_attention")
    return {"attention": "torch attention" if attend is None else f"{'native' if native_attend else 'numba'} decode kernel",
            "qkv": linear(block.attention.query_key_value), "mlp_h_to_4h": linear(block.mlp.dense_h_to_4h),
            "mlp_activation": mlp, "lm_head": kernel(head.head.small) if head.head is not None and head.head.small is not None
            else "torch matmul"}


def measure(model: GLMModel, prefills: list[int], batches: list[int], steps: int, runs: int, out: dict) -> None:
    """The rows, written into `out` as each is measured (an interrupted run keeps the rows it has)."""
    device, cfg = model.device, model.cfg
    context = out["context"]
    with torch.inference_mode():
        for n in prefills:
            _row(out, f"prefill {n} tokens ({runs} runs)")
            tokens = torch.randint(0, cfg.vocab_size, (1, n), device=device)
            layout = SeqLayout(torch.zeros(1, dtype=torch.long), torch.tensor([n - 1]))
            cache = model.new_cache(1, n)
            times = timed(lambda: model(tokens, torch.arange(n, device=device)[None], layout, cache), device, runs)
            out["prefill_ms"][n] = summary(times)
            progress(f"  prefill {n} tokens: {out['prefill_ms'][n]['median']:.2f} ms")
        for b in batches:
            _row(out, f"decode batch {b} ({runs} runs of {steps} steps)")
            decode, rewind = decode_call(model, b, steps, context)
            times = [t / steps for t in timed(decode, device, runs, setup=rewind)]
            out["decode_ms_per_step"][b] = summary(times)
            progress(f"  decode batch {b}: {out['decode_ms_per_step'][b]['median']:.2f} ms/step")
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:  # the process's peak resident memory (weights, caches, and the interpreter)
        out["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


def _row(out: dict, what: str) -> None:
    done = len(out["prefill_ms"]) + len(out["decode_ms_per_step"])
    progress(f"row {done + 1}/{out['rows']}: {what}")


def summary(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "runs": len(ms)}


def reference_times(cfg: ModelConfig, prefills: list[int], steps: int, runs: int, context: int,
                    ours: tuple) -> dict | None:
    """SwissArmyTransformer's GLM130B on random weights of the same shape (CPU fp16, the only dtype it runs
    there): prefill of each length with logits at the last position, and its own decode loop, where the KV
    memory (`mems`) grows by concatenation every step, timed in alternation with `ours` (glm-tp's batch-1
    decode_call) so that the decode ratio holds on a machine whose speed drifts. None when it is not
    installed."""
    if not reference.available():
        return None
    progress("reference: building SwissArmyTransformer's GLM130B")
    ref = reference.build(cfg)
    out: dict = {"prefill_ms": {}}
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02)
        for n in (n for n in prefills if n <= cfg.max_seq_len):
            progress(f"reference: prefill {n} tokens ({runs} runs)")
            tokens = torch.randint(0, cfg.vocab_size, (1, n))
            times = timed(lambda: ref(tokens, torch.arange(n)[None], reference.mask(n, n - 1)), torch.device("cpu"), runs)
            out["prefill_ms"][n] = statistics.median(times) * 1e3
        tokens = torch.randint(0, cfg.vocab_size, (1, context))
        _, *layers = ref(tokens, torch.arange(context)[None], reference.mask(context, context - 1))
        mems = torch.stack([o["mem_kv"] for o in layers])

        def decode() -> None:
            m = mems
            for i in range(steps):
                mask = torch.zeros(1, 1, 1, context + i + 1, dtype=torch.bool)
                _, *outs = ref(tokens[:, -1:], torch.tensor([[context + i]]), mask, mems=m)
                m = torch.cat([m, torch.stack([o["mem_kv"] for o in outs])], dim=2)

        progress(f"reference: decode batch 1, in turn with glm-tp's ({runs} rounds of {steps} steps each)")
        glm, theirs = alternated([ours, (decode, None)], torch.device("cpu"), runs)
    out["decode_ms"] = statistics.median(theirs) / steps * 1e3
    out["glm_tp_decode_ms"] = statistics.median(glm) / steps * 1e3  # the same rounds
    out["decode_ratio_per_round"] = [r / g for r, g in zip(theirs, glm)]
    return out


class Stopped(Exception):
    """SIGINT or SIGTERM: the rows measured so far are printed."""


def _stop(signum: int, frame: object) -> None:  # noqa: ARG001
    raise Stopped(signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--inner", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--max-len", type=int, help="the model's max sequence length (default: the preset's)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--quant", choices=("none", "int8", "int4"), default="none")
    ap.add_argument("--simulate-tp", type=int, default=0, help="run one rank of a TP=N job on this device")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prefill", default="128,512,2048")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens in the cache before decoding")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reference", action="store_true", help="also time SwissArmyTransformer (CPU fp16)")
    ap.add_argument("--kernels", choices=KERNELS, default="fused", help="quantized matmul kernels")
    ap.add_argument("--lm-head", choices=LM_HEADS, default="model", help="int8: an INT8 copy of the LM head")
    ap.add_argument("--compare-decode-ops", action="store_true",
                    help="also time batch-1 decode with the decode-attention and SwiGLU kernels and with torch's ops in "
                         "their place, in turn")
    ap.add_argument("--compare-attention", action="store_true",
                    help="also time batch-1 decode with the native decode attention and numba's, in turn")
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--plot", help="write a PNG of ms/token against batch size")
    return ap


def overrides(args: argparse.Namespace) -> dict[str, int]:
    """The preset's dimensions that the command line changes."""
    return {k: v for k, v in dict(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                                  inner_hidden_size=args.inner, vocab_size=args.vocab,
                                  max_seq_len=args.max_len).items() if v}


def setup(args: argparse.Namespace) -> tuple[ModelConfig, TPContext, str]:
    """The model's shape, this rank, and the label of the run."""
    base = get_preset(args.preset)
    cfg = ModelConfig(**{**base.to_dict(), "special": base.special, **overrides(args)})
    if args.simulate_tp:
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if args.device == "auto" else args.device)
        tp = simulated_rank(args.simulate_tp, device=device)
        label = f"single-rank simulation of TP={args.simulate_tp} (collectives not included)"
    else:
        tp = init_distributed(args.device)
        label = f"TP={tp.size}, real ranks"
    cfg.check_tp(tp.size)
    return cfg, tp, label


def run(args: argparse.Namespace, cfg: ModelConfig, tp: TPContext, label: str, result: dict) -> None:
    """Everything measured goes into `result` as soon as it is known."""
    dtype, bits = parse_dtype(args.dtype), {"none": 0, "int8": 8, "int4": 4}[args.quant]
    plan = Plan(cfg, tp.size, dtype.itemsize, bits, 1, 1)
    prefills = [n for n in map(int, args.prefill.split(",")) if n <= cfg.max_seq_len]
    batches = [int(x) for x in args.batches.split(",")]
    result.update(label=label, device=str(tp.device), dtype=args.dtype, quant=args.quant, kernels=args.kernels,
                  lm_head=args.lm_head, shape=overrides(args) or args.preset,
                  layers=cfg.num_layers, weight_bytes_per_rank=plan.weight_bytes, threads=torch.get_num_threads(),
                  read_bytes_per_step=decode_read_bytes(plan, args.lm_head), prefill_ms={}, decode_ms_per_step={},
                  context=min(args.context, cfg.max_seq_len - args.steps), rows=len(prefills) + len(batches))
    progress(f"glm-tp bench: {len(prefills)} prefill and {len(batches)} decode rows ({args.runs} timed runs each) of a "
             f"random {cfg.num_layers}-layer model, {plan.weight_bytes / 1e6:,.1f} MB of weights per rank ({label}); "
             f"the device's bandwidth and matmul peak first, then an estimate of the time; each row prints when done, "
             f"Ctrl-C or SIGTERM prints the rows so far")
    bandwidth, peak = read_bandwidth(tp.device), matmul_peak(cfg, tp.size, tp.device, dtype, bits, args.kernels)
    result.update(read_bandwidth_gbs=bandwidth / 1e9, matmul_peak_tflops=peak / 1e12)
    least = least_seconds(cfg, tp.size, dtype.itemsize, result, prefills, batches, args, bandwidth, peak)
    progress(f"the {result['rows']} rows take at least {least / 60:.1f} min here ({least:.1f} s: every timed call at "
             f"this device's ceiling, which measured calls fall short of; plus building the model)")
    progress(f"building a random {cfg.num_layers}-layer model ({args.dtype}/{args.quant})")
    model = random_model(cfg, tp, dtype, bits, args.kernels, args.lm_head)
    count_bytes(model, plan, args, result)
    result["kernel_paths"] = kernel_paths(model)
    progress("decode kernels: " + "; ".join(f"{k} {v}" for k, v in result["kernel_paths"].items()))
    measure(model, prefills, batches, args.steps, args.runs, result)
    result["allreduce_ms_per_step"] = allreduce_ms(tp, cfg, dtype, args.runs)
    if args.compare_decode_ops:
        result["decode_ops"] = compare_decode_ops(model, args.steps, args.runs, result["context"])
    if args.compare_attention:
        result["attention"] = compare_attention(model, args.steps, args.runs, result["context"])
        progress("decode attention: " + json.dumps(result["attention"]))
    add_ceilings(result, cfg, tp.size, dtype.itemsize, result["read_bytes_per_step"], bandwidth, peak)
    if args.reference:
        ref = reference_times(cfg, list(result["prefill_ms"]), args.steps, args.runs, result["context"],
                              decode_call(model, 1, args.steps, result["context"]))
        result["reference"] = ref
        if ref:
            result["speedup_vs_reference"] = {
                "decode": statistics.median(ref["decode_ratio_per_round"]),
                **{f"prefill_{n}": ms / result["prefill_ms"][n]["median"] for n, ms in ref["prefill_ms"].items()}}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    cfg, tp, label = setup(args)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    result: dict = {}
    try:
        run(args, cfg, tp, label, result)
    except Stopped as stop:
        if tp.is_first:
            print_stopped(result, str(stop), cfg, tp.size)
        sys.exit(130 if str(stop) == "SIGINT" else 143)  # the shell's code for a run ended by that signal
    if tp.is_first:
        print_table(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if args.plot:
            plot(result, args.plot)


def print_stopped(result: dict, signame: str, cfg: ModelConfig, tp: int) -> None:
    """The table of the rows measured before the signal (none before the device's ceilings are known)."""
    if "matmul_peak_tflops" not in result:
        progress(f"stopped by {signame} before any row was measured")
        return
    result["stopped"] = signame
    dtype_bytes = parse_dtype(result["dtype"]).itemsize
    add_ceilings(result, cfg, tp, dtype_bytes, result["read_bytes_per_step"], result["read_bandwidth_gbs"] * 1e9,
                 result["matmul_peak_tflops"] * 1e12)
    print_table(result)


if __name__ == "__main__":
    main()
