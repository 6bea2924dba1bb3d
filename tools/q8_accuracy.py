#!/usr/bin/env python
"""The effect of Q8_0 activations (kernels=q8: the native integer kernel for small batches, numba's for
larger ones) on the bundled demo model, quantized at load: held-out accuracy per task and how often the
answers equal those of the weight-only kernels (kernels=fused); and the logit gap of a decode step (2 rows
after a 12-token prefill of random tokens), q8 against fused.

    python tools/q8_accuracy.py --count 60
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from glm_tp import load_model  # noqa: E402
from glm_tp.cli.settings import DEMO  # noqa: E402
from glm_tp.dev.demo_corpus import TASKS, held_out  # noqa: E402
from glm_tp.engine.core import Engine  # noqa: E402
from glm_tp.engine.types import GenerationConfig, Request  # noqa: E402
from glm_tp.kernels import native  # noqa: E402
from glm_tp.model.glm import SeqLayout  # noqa: E402
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
        a, b = decode_logits(quant, "fused", seed), decode_logits(quant, "q8", seed)
        gaps.append(float((a - b).abs().max() / a.abs().max()))
        same += int(torch.equal(a.argmax(-1), b.argmax(-1)))
    return (f"{quant}: decode-step logits, q8 vs fused over {seeds} random prompts: max |gap| / max |logit| "
            f"median {sorted(gaps)[seeds // 2]:.4f}, worst {max(gaps):.4f}; greedy tokens equal in {same}/{seeds}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=60)
    args = ap.parse_args()
    print(native.describe())
    print("| quant | task | accuracy fused | accuracy q8 | q8 answers equal to fused |\n|---|---|---:|---:|---:|")
    for quant in ("int8", "int4"):
        fused, q8 = answers(quant, "fused", args.count), answers(quant, "q8", args.count)
        for kind in TASKS:
            truth = [e.answers for e in held_out(kind, args.count)]
            acc = [sum(a == t for a, t in zip(got[kind], truth)) / len(truth) for got in (fused, q8)]
            same = sum(a == b for a, b in zip(fused[kind], q8[kind])) / len(truth)
            print(f"| {quant} | {kind} | {acc[0]:.3f} | {acc[1]:.3f} | {same:.3f} |")
    for quant in ("int8", "int4"):
        print(logit_gaps(quant))


if __name__ == "__main__":
    main()
