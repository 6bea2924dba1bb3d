"""Fidelity of the CPU kernels on a random model of a preset's shape (tools/q8_accuracy.py --shape): weights
drawn N(0, 1/in) and quantized to the release's row-absmax format, greedy decode steps of the fp32 reference
(dequantized weights, fp32 activations), and the same tokens through a bf16 copy under kernels "fused"
(Q8_0 activations for decode batches) and "weight-only"; each step's logits against the reference's."""
from __future__ import annotations

import dataclasses

import torch

from glm_tp.config import get_preset
from glm_tp.kernels.formats import quantize_rows
from glm_tp.model.glm import GLMModel, SeqLayout
from glm_tp.parallel.dist import TPContext

PROMPT = 16


def _random_model(cfg, bits: int) -> GLMModel:
    model = GLMModel(cfg, TPContext(), torch.float32, "cpu", quant_bits=bits)
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.dtype == torch.int8:
            k = p.shape[1] * (2 if bits == 4 else 1)
            q, scale = quantize_rows(torch.randn(p.shape[0], k, generator=gen) * k ** -0.5, bits)
            p.copy_(q)
            params[name + "_scale"].copy_(scale)
        elif name.endswith("_scale"):
            continue
        elif "layernorm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02, generator=gen)
    return model.eval()


def _positions(cfg, start: int, n: int) -> torch.Tensor:
    pos = torch.arange(start, start + n).view(1, n)
    return torch.stack([pos, torch.zeros_like(pos)], -1) if cfg.position_encoding == "2d" else pos


def _step_logits(model: GLMModel, tokens: torch.Tensor) -> torch.Tensor:
    """[steps + 1, vocab] fp32: the prompt's last logits, then one decode step per later token."""
    cfg, total = model.cfg, tokens.shape[1]
    layout = SeqLayout(pad=torch.tensor([0]), bidirectional=torch.tensor([PROMPT // 2]))
    with torch.inference_mode():
        cache = model.new_cache(1, total + 1)
        out = [model(tokens[:, :PROMPT], _positions(cfg, 0, PROMPT), layout, cache).reshape(-1).float()]
        for t in range(PROMPT, total):
            out.append(model(tokens[:, t:t + 1], _positions(cfg, t, 1), layout, cache, start=t).reshape(-1).float())
    return torch.stack(out)


def _greedy(model: GLMModel, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    cfg = model.cfg
    layout = SeqLayout(pad=torch.tensor([0]), bidirectional=torch.tensor([PROMPT // 2]))
    tokens = prompt
    with torch.inference_mode():
        cache = model.new_cache(1, PROMPT + steps + 1)
        logits = model(prompt, _positions(cfg, 0, PROMPT), layout, cache)
        for t in range(PROMPT, PROMPT + steps):
            nxt = logits.reshape(1, -1).argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            logits = model(nxt, _positions(cfg, t, 1), layout, cache, start=t)
    return tokens


def shaped_report(preset: str, layers: int, vocab: int, bits: int, steps: int) -> str:
    cfg = dataclasses.replace(get_preset(preset), num_layers=layers, vocab_size=vocab)
    ref = _random_model(cfg, bits)
    ref.prepare_kernels("dequant")
    prompt = torch.randint(3, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    tokens = _greedy(ref, prompt, steps)
    want = _step_logits(ref, tokens)
    model = GLMModel(cfg, TPContext(), torch.bfloat16, "cpu", quant_bits=bits)
    model.load_state_dict(ref.state_dict())
    del ref
    lines = [f"{preset} shape, {layers} layers, vocab {vocab}, INT{bits}, {steps} greedy steps after a "
             f"{PROMPT}-token prompt (teacher-forced on the fp32 reference's tokens):"]
    got = {}
    for kernels in ("weight-only", "fused"):
        model.eval().prepare_kernels(kernels)
        got[kernels] = _step_logits(model, tokens)
        gap = ((got[kernels] - want).abs().amax(-1) / want.abs().amax(-1))
        same = int((got[kernels].argmax(-1) == want.argmax(-1)).sum())
        lines.append(f"  {kernels:>11} vs fp32: greedy tokens equal {same}/{steps + 1}, max |gap| / max |logit| "
                     f"median {gap.median():.4f}, worst {gap.max():.4f}")
    gap = ((got["fused"] - got["weight-only"]).abs().amax(-1) / got["weight-only"].abs().amax(-1))
    same = int((got["fused"].argmax(-1) == got["weight-only"].argmax(-1)).sum())
    lines.append(f"  fused vs weight-only: greedy tokens equal {same}/{steps + 1}, max |gap| / max |logit| "
                 f"median {gap.median():.4f}, worst {gap.max():.4f}")
    return "\n".join(lines)
