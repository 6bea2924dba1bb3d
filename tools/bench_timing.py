"""bench.py's timing: calls in alternation (`alternated`), the engine's decode path as one timed call
(`decode_call`), and the decode kernels against torch's ops or numba's in turn (`--compare-decode-ops`,
`--compare-attention`)."""
from __future__ import annotations

import functools
import statistics
import sys
import time

import torch

from glm_tp.engine.decoder import Decoder
from glm_tp.model.glm import GLMModel

_START = time.perf_counter()


def progress(message: str) -> None:
    """A line on stderr per measurement (a full run takes minutes); only rank 0 speaks."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"[bench {time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, runs: int, setup=None) -> list[float]:
    """Seconds per call of fn (after one warm-up call); setup() runs untimed before each call."""
    return alternated([(fn, setup)], device, runs)[0]


def alternated(calls: list[tuple], device: torch.device, runs: int) -> list[list[float]]:
    """Seconds per call of each (fn, setup) in `calls`, called in turn `runs` times (after one warm-up
    round): on a machine whose speed drifts, each round's calls meet the same conditions, so their
    ratio holds where separate runs of each would not."""
    out: list[list[float]] = [[] for _ in calls]
    for run in range(runs + 1):
        for (fn, setup), times in zip(calls, out):
            if setup is not None:
                setup()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if run:
                times.append(time.perf_counter() - start)
    return out


def decode_call(model: GLMModel, b: int, steps: int, context: int) -> tuple:
    """(fn, setup): `steps` decode steps of `b` rows after a `context`-token prompt, through the engine's
    decode path (one reused cache, static step inputs, graphs on CUDA); setup rewinds the cache."""
    device, cfg = model.device, model.cfg
    decoder = Decoder(model, b, context + steps)
    tokens = torch.randint(0, cfg.vocab_size, (b, context), device=device)
    positions = torch.arange(context, device=device).expand(b, -1)
    step_tokens = tokens[:, -1].contiguous()
    with torch.inference_mode():
        decoder.prefill(tokens, positions, torch.full((b,), context - 1), torch.full((b,), context),
                        torch.ones(b, dtype=torch.long))

    @torch.inference_mode()
    def decode() -> None:
        for _ in range(steps):
            decoder.step(step_tokens)

    return decode, lambda: decoder.restart(b)


def compare_decode_ops(model: GLMModel, steps: int, runs: int, context: int) -> dict:
    """Batch-1 decode of one model with its decode-attention and SwiGLU kernels and with torch's ops in their
    place (the GEMVs unchanged), round by round in turn (`alternated`): each round's setup switches them."""
    layers = model.transformer.layers
    chosen = [(block.attention.decode_kernel, block.mlp.fused) for block in layers]
    decode, rewind = decode_call(model, 1, steps, context)

    def use(kernels: bool) -> None:
        for block, (attend, fused) in zip(layers, chosen):
            block.attention.decode_kernel, block.mlp.fused = (attend, fused) if kernels else (None, False)
        rewind()

    progress(f"decode batch 1 with the decode kernels and with torch's ops, in turn ({runs} rounds of {steps} steps)")
    ours, theirs = alternated([(decode, lambda: use(True)), (decode, lambda: use(False))], model.device, runs)
    use(True)
    return {"kernels_ms": statistics.median(ours) / steps * 1e3, "torch_ops_ms": statistics.median(theirs) / steps * 1e3,
            "speedup_per_round": [t / k for k, t in zip(ours, theirs)]}


def compare_attention(model: GLMModel, steps: int, runs: int, context: int) -> dict:
    """Batch-1 decode round by round in turn with the native decode attention (the default where built) and
    numba's; and the attention calls' own time inside each step (wall time around each call)."""
    from glm_tp.kernels import cpu_attention, native_attention

    layers = model.transformer.layers
    chosen = [block.attention.decode_kernel for block in layers]
    if any(k is None or k.func is not native_attention.decode_attention for k in chosen):
        raise SystemExit("--compare-attention: the native decode attention is not in use here")
    decode, rewind = decode_call(model, 1, steps, context)
    variants = {"native": True, "numba": False}
    inside: dict[str, list[float]] = {name: [] for name in variants}

    def timer(kernel, into: list):
        def call(*args):
            start = time.perf_counter()
            out = kernel(*args)
            into.append(time.perf_counter() - start)
            return out
        return call

    def use(name: str) -> None:
        for block, kernel in zip(layers, chosen):
            func = kernel.func if variants[name] else cpu_attention.decode_attention
            block.attention.decode_kernel = timer(functools.partial(func, **kernel.keywords), inside[name])
        rewind()

    progress(f"decode batch 1 with {', '.join(variants)} attention in turn ({runs} rounds of {steps} steps)")
    times = alternated([(decode, functools.partial(use, name)) for name in variants], model.device, runs)
    for block, kernel in zip(layers, chosen):
        block.attention.decode_kernel = kernel
    base = times[-1]
    return {"ms": {name: statistics.median(t) / steps * 1e3 for name, t in zip(variants, times)},
            "ratio_to_numba_per_round": {name: [a / b for a, b in zip(t, base)] for name, t in zip(variants, times[:-1])},
            # warm-up round included
            "attention_ms_per_step": {name: sum(t) / ((runs + 1) * steps) * 1e3 for name, t in inside.items()}}
