"""tools/bench.py's arithmetic and output: the ceilings the measurements are compared with (the device's
measured bandwidth and matmul peak), the table (also of the rows measured before an interrupt) and the plot."""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from glm_tp.cli.planner import Plan  # noqa: E402
from glm_tp.config import ModelConfig  # noqa: E402


def step_flops(cfg: ModelConfig, tp: int, rows: int, tokens: int, keys: int) -> float:
    """One rank's FLOPs for `rows` x `tokens` new tokens attending to `keys` keys each (logits at one
    position per row)."""
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    qkv = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim * h  # grouped-query: the KV groups' rows only
    linear = (qkv + h * h + ((2 * f if cfg.glu else f) + f) * h) // tp
    attention = 4 * tokens * keys * h // tp
    return 2 * rows * (cfg.num_layers * (tokens * linear + attention) + cfg.vocab_size // tp * h)


def decode_read_bytes(plan: Plan, lm_head: str, weight_bytes: int | None = None) -> int:
    """The weight bytes a decode step reads: the rank's weights (the plan's, or `weight_bytes` counted on a
    model's tensors), less an untied embedding table (a step reads one row of it), and with lm_head=int8
    the head as int8 with fp16 row scales instead."""
    c = plan.cfg
    rows = c.vocab_size // plan.tp
    weights = plan.weight_bytes if weight_bytes is None else weight_bytes
    read = weights - (0 if c.tied_lm_head else rows * c.hidden_size * plan.dtype_bytes)
    if lm_head == "int8":
        read += rows * c.hidden_size + 2 * rows - rows * c.hidden_size * plan.dtype_bytes
    return read


def decode_ceiling_s(cfg: ModelConfig, tp: int, dtype_bytes: int, weight_bytes: int, rows: int, context: int,
                     bandwidth: float, peak: float) -> float:
    """The fastest a decode step can be: it reads the weights and every row's keys and values and computes its
    FLOPs, at the measured bandwidth and matmul peak."""
    kv_per_token = 2 * cfg.num_layers * cfg.kv_heads_per_rank(tp) * cfg.head_dim * dtype_bytes
    read = weight_bytes + rows * (context + 1) * kv_per_token
    return max(read / bandwidth, step_flops(cfg, tp, rows, 1, context + 1) / peak)


def least_seconds(cfg: ModelConfig, tp: int, dtype_bytes: int, r: dict, prefills: list[int], batches: list[int],
                  args: argparse.Namespace, bandwidth: float, peak: float) -> float:
    """The least time the rows can take: every call (warm-up included, and each decode row's prompt) at the
    device's ceiling."""
    runs, context = args.runs + 1, r["context"]
    total = sum(runs * step_flops(cfg, tp, 1, n, n) / peak for n in prefills)
    for b in batches:
        step = decode_ceiling_s(cfg, tp, dtype_bytes, r["read_bytes_per_step"], b, context, bandwidth, peak)
        total += step_flops(cfg, tp, b, context, context) / peak + runs * args.steps * step
    return total


def add_ceilings(r: dict, cfg: ModelConfig, tp: int, dtype_bytes: int, weight_bytes: int, bandwidth: float,
                 peak: float) -> None:
    """What the device allows (decode_ceiling_s; a prefill computes its FLOPs). Efficiency = ceiling / measured."""
    context = r["context"]
    r["decode_ceiling_ms"], r["decode_efficiency"] = {}, {}
    for b, s in r["decode_ms_per_step"].items():
        ceiling = decode_ceiling_s(cfg, tp, dtype_bytes, weight_bytes, int(b), context, bandwidth, peak) * 1e3
        r["decode_ceiling_ms"][b], r["decode_efficiency"][b] = ceiling, ceiling / s["median"]
    # the bandwidth-only view at batch 1: weight bytes per token / time / measured bandwidth
    r["bandwidth_limit_ms"] = weight_bytes / bandwidth * 1e3
    if 1 in r["decode_ms_per_step"]:
        r["bandwidth_efficiency"] = r["bandwidth_limit_ms"] / r["decode_ms_per_step"][1]["median"]
        full = r.get("full_depth")
        if full:  # the whole model read at the rate this run's batch-1 step read its layers
            full["ms_per_step_at_this_rate"] = (r["decode_ms_per_step"][1]["median"] * full["read_bytes_per_step"]
                                                / weight_bytes)
    r["prefill_mfu"] = {n: step_flops(cfg, tp, 1, int(n), int(n)) / (s["median"] / 1e3) / peak
                        for n, s in r["prefill_ms"].items()}


def print_table(r: dict) -> None:
    print(f"glm-tp bench: {r['label']}; {r['layers']} layers, {r['dtype']}/{r['quant']} (kernels {r['kernels']}, "
          f"LM head {r['lm_head']}) on {r['device']} "
          f"({r['threads']} threads); weights/rank {r['weight_bytes_per_rank'] / 1e6:.1f} MB "
          f"({r['read_bytes_per_step'] / 1e6:.1f} MB read per decode step); "
          f"read bandwidth {r['read_bandwidth_gbs']:.1f} GB/s; matmul peak {r['matmul_peak_tflops']:.3f} TFLOP/s")
    if "kernel_paths" in r:
        print("  decode kernels: " + "; ".join(f"{k} {v}" for k, v in r["kernel_paths"].items()))
    for n, s in r["prefill_ms"].items():
        print(f"  prefill {n:>5} tokens: {s['median']:9.2f} ms (min {s['min']:.2f}, max {s['max']:.2f})"
              f"  {r['prefill_mfu'][n]:.0%} of the matmul peak")
    for b, s in r["decode_ms_per_step"].items():
        print(f"  decode batch {b:>3} (context {r['context']}): {s['median']:9.2f} ms/step (min {s['min']:.2f}, "
              f"max {s['max']:.2f})  {int(b) * 1e3 / s['median']:9.1f} tokens/s  ceiling "
              f"{r['decode_ceiling_ms'][b]:.2f} ms -> {r['decode_efficiency'][b]:.0%}")
    if "bandwidth_efficiency" in r:
        print(f"  batch 1: weights read at {r['read_bytes_per_step'] / r['decode_ms_per_step'][1]['median'] / 1e6:.1f}"
              f" GB/s = {r['bandwidth_efficiency']:.0%} of the measured bandwidth "
              f"(limit {r['bandwidth_limit_ms']:.2f} ms/step)")
    full = r.get("full_depth")
    if full and "bandwidth_efficiency" in r:
        print(f"  at full depth ({full['layers']} layers): {full['read_bytes_per_step'] / 1e6:.1f} MB read per decode step; "
              f"at this run's batch-1 read rate {full['ms_per_step_at_this_rate']:.1f} ms/step (an estimate)")
    ops = r.get("decode_ops")
    if ops:
        rounds = ops["speedup_per_round"]
        print(f"  decode batch   1, in turn: {ops['kernels_ms']:.2f} ms/step with the decode-attention and SwiGLU kernels, "
              f"{ops['torch_ops_ms']:.2f} with torch's ops in their place -> {statistics.median(rounds):.2f}x "
              f"(median of {len(rounds)} rounds, {min(rounds):.2f}-{max(rounds):.2f}x)")
    if "stopped" in r:  # an interrupted run: the rows above are all it measured
        print(f"  stopped by {r['stopped']} after {len(r['prefill_ms']) + len(r['decode_ms_per_step'])} of "
              f"{r['rows']} rows")
        return
    ar = r["allreduce_ms_per_step"]
    print("  all-reduces per decode step: " + (f"{ar:.2f} ms" if ar is not None else "none (one rank)"
                                                 if "simulation" not in r["label"] else
                                                 "not measured (single-rank simulation: no other ranks)"))
    if "reference" in r:
        ref = r["reference"]
        if ref is None:
            print("  reference (SwissArmyTransformer): not installed (pip install -e '.[reference]')")
            return
        speedup = r["speedup_vs_reference"]
        for n, ms in ref["prefill_ms"].items():
            print(f"  reference prefill {n:>5} tokens (SwissArmyTransformer, CPU fp16): {ms:9.2f} ms -> glm-tp "
                  f"{speedup[f'prefill_{n}']:.2f}x as fast")
        ratios = ref["decode_ratio_per_round"]
        print(f"  reference decode batch   1 (SwissArmyTransformer, CPU fp16): {ref['decode_ms']:9.2f} ms/step, in turn "
              f"with glm-tp's ({ref['glm_tp_decode_ms']:.2f} ms/step in the same rounds) -> glm-tp "
              f"{speedup['decode']:.2f}x as fast (median of {len(ratios)} rounds, {min(ratios):.2f}-{max(ratios):.2f}x)")


def plot(r: dict, path: str) -> None:
    """ms per generated token against batch size, with the device's ceiling drawn in."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib (or the [plot] extra)")
        return
    batches = [int(b) for b in r["decode_ms_per_step"]]
    per_token = [s["median"] / b for b, s in zip(batches, r["decode_ms_per_step"].values())]
    ceiling = [ms / b for b, ms in zip(batches, r["decode_ceiling_ms"].values())]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(batches, per_token, marker="o", label="measured")
    ax.plot(batches, ceiling, color="red", linestyle="--", label="ceiling (bandwidth or compute)")
    ax.axhline(r["bandwidth_limit_ms"], color="grey", linestyle=":", label="batch-1 weight-read limit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"ms per generated token (context {r['context']})")
    ax.set_title(f"{r['label']}\n{r['layers']} layers, {r['dtype']}/{r['quant']} on {r['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

