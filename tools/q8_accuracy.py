#!/usr/bin/env python
"""The effect of Q8_0 activations (kernels=fused on CPU: the native integer kernel for decode batches) on
the bundled demo model, quantized at load: held-out accuracy per task and how often the answers equal
those of the weight-only kernels (kernels=weight-only); the logit gap of a decode step (2 rows after a
12-token prefill of random tokens), fused against weight-only; and, with --shape, the same on a random
model of a preset's shape (fewer layers, a smaller vocabulary): greedy decode steps of the fp32 reference
(dequantized weights, fp32 activations), then the same tokens through the bf16 model's fused and
weight-only kernels, each step's logits against the reference's.

    python tools/q8_accuracy.py --count 60
    python tools/q8_accuracy.py --count 0 --shape chatglm-6b --layers 4 --vocab 32000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from glm_tp import load_model  # noqa: E402
from glm_tp.cli.settings import DEMO  # noqa: E402
from glm_tp.dev.demo_corpus import TASKS, held_out  # noqa: E402
from glm_tp.engine.core import Engine  # noqa: E402
from glm_tp.engine.types import GenerationConfig, Request  # noqa: E402
from glm_tp.kernels import native  # noqa: E402
from glm_tp.model.glm import SeqLayout  # noqa: E402
from shaped_fidelity import shaped_report  # noqa: E402
from glm_tp.text.tokenizer import load_tokenizer  # noqa: E402


def answers(quant: str, kernels: str, count: int) -> dict[str, list]:
    model = load_model(DEMO, quant=quant, kernels=kernels, progress=False)
    engine = Engine(model, load_tokenizer(DEMO / "tokenizer.model", model.cfg.special),
                    GenerationConfig(max_new_tokens=12), max_batch=8)
    out = {}
    for kind in TASKS:
        cases = held_out(kind, count)
        out[kind] = [r.blanks for r in engine.generate([Request(str(i), e.prompt) for i, e in enumerate(cases)])]
    return out


def decode_logits(quant: str, kernels: str, seed: int) -> torch.Tensor:
    """[2, vocab] logits of one decode step after a prefill of 12 random tokens (bidirectional prefix 4)."""
    model = load_model(DEMO, quant=quant, kernels=kernels, progress=False)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 100, (2, 12), generator=gen)
    positions = torch.arange(12).expand(2, 12)
    layout = SeqLayout(pad=torch.tensor([0, 0]), bidirectional=torch.tensor([4, 4]))
    with torch.inference_mode():
        cache = model.new_cache(2, 16)
        first = model(tokens, positions, layout, cache).reshape(2, -1)  # the last position's logits
        nxt = first.argmax(-1, keepdim=True)
        return model(nxt, positions[:, -1:] + 1, layout, cache, start=12).reshape(2, -1).float()


def logit_gaps(quant: str, seeds: int = 8) -> str:
    gaps, same = [], 0
    for seed in range(seeds):
        a, b = decode_logits(quant, "weight-only", seed), decode_logits(quant, "fused", seed)
        gaps.append(float((a - b).abs().max() / a.abs().max()))
        same += int(torch.equal(a.argmax(-1), b.argmax(-1)))
    return (f"{quant}: decode-step logits, fused vs weight-only over {seeds} random prompts: max |gap| / max |logit| "
            f"median {sorted(gaps)[seeds // 2]:.4f}, worst {max(gaps):.4f}; greedy tokens equal in {same}/{seeds}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=60, help="held-out cases per task (0: skip the demo model)")
    ap.add_argument("--shape", help="also a random model of this preset's shape, e.g. chatglm-6b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=24, help="greedy decode steps of the shaped model")
    ap.add_argument("--bits", default="8,4", help="the shaped model's weight bits, e.g. 8,4 or 4")
    args = ap.parse_args()
    print(native.describe())
    if args.count:
        print("| quant | task | accuracy weight-only | accuracy fused | fused answers equal |\n|---|---|---:|---:|---:|")
        for quant in ("int8", "int4"):
            plain, fused = answers(quant, "weight-only", args.count), answers(quant, "fused", args.count)
            for kind in TASKS:
                truth = [e.answers for e in held_out(kind, args.count)]
                acc = [sum(a == t for a, t in zip(got[kind], truth)) / len(truth) for got in (plain, fused)]
                same = sum(a == b for a, b in zip(plain[kind], fused[kind])) / len(truth)
                print(f"| {quant} | {kind} | {acc[0]:.3f} | {acc[1]:.3f} | {same:.3f} |")
        for quant in ("int8", "int4"):
            print(logit_gaps(quant))
    if args.shape:
        for bits in (int(b) for b in args.bits.split(",")):
            print(shaped_report(args.shape, args.layers, args.vocab, bits, args.steps), flush=True)


if __name__ == "__main__":
    main()
