#!/usr/bin/env python
"""Train the bundled demo model: a small GLM that fills blanks in the tasks of glm_tp/dev/demo_corpus.py.

    python tools/train_demo.py --out glm_tp/demo

Same architecture and blank layout as glm-tp serves (bidirectional context, [MASK] positions pinned
to the mask, [gMASK] positions counting on, one fill pass per blank with earlier answers filled in).
It trains its own sentencepiece tokenizer, then the model on CPU at TP=1, and writes a release-format
checkpoint with glm_tp.json metadata and the tokenizer beside it. Seeded: the same command gives the
same model on the same machine.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import _common  # noqa: F401 - makes glm_tp importable from a source checkout
import sentencepiece as spm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from glm_tp.checkpoints.release import make_metadata, write_latest, write_shard
from glm_tp.checkpoints.synthetic import random_shard
from glm_tp.cli.output import prepare_output
from glm_tp.config import ModelConfig, SpecialTokens
from glm_tp.dev.demo_corpus import (
    DAYS,
    DIGITS,
    MONTHS,
    TASKS,
    TRAIN_SEED,
    WORDS,
    held_out,
    tokenizer_corpus,
)
from glm_tp.engine.core import Engine
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.model.glm import GLMModel, SeqLayout
from glm_tp.parallel.dist import single_process
from glm_tp.text.blanks import fill_kind, next_blank, splice, tokenize_prompt
from glm_tp.text.tokenizer import GLMTokenizer

TASK_WEIGHTS = {"recall": 3, "cycle": 1, "repeat": 2, "two": 2}


def train_tokenizer(folder: Path) -> Path:
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(tokenizer_corpus()) + "\n")
    symbols = sorted(set(WORDS + DAYS + MONTHS + DIGITS + ["<n>", ":", "."]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=200,
                                   model_type="unigram", hard_vocab_limit=False, user_defined_symbols=symbols,
                                   minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def demo_config(text_vocab: int) -> ModelConfig:
    base = text_vocab  # control tokens follow the text vocabulary, in GLM's order
    special = SpecialTokens(mask=base, gmask=base + 1, smask=base + 2, sop=base + 4, eop=base + 5, eos=2, pad=0)
    return ModelConfig(num_layers=4, hidden_size=192, num_heads=8, inner_hidden_size=384,
                       vocab_size=math.ceil((base + 8) / 64) * 64, max_seq_len=96, special=special)


def passes(prompt: str, answers: list[str], tok: GLMTokenizer) -> list[tuple[list[int], list[int], int, list[int]]]:
    """One training sequence per blank: (tokens, positions, bidirectional, targets), exactly as generated."""
    ids = tokenize_prompt(prompt, tok)
    kind = fill_kind(ids, tok.special)
    out = []
    for answer in answers:
        blank = next_blank(ids, kind, tok.special)
        gen = tok.encode(answer)
        tokens = blank.tokens + gen
        positions = blank.positions + [blank.position_after(t) for t in range(len(gen))]
        out.append((tokens, positions, blank.bidirectional, gen + [tok.special.eop]))
        ids = splice(ids, blank.mask_index, gen)
    return out


def make_batch(rng: random.Random, tok: GLMTokenizer, size: int):
    kinds = list(TASK_WEIGHTS)
    seqs = []
    while len(seqs) < size:
        example = TASKS[rng.choices(kinds, weights=[TASK_WEIGHTS[k] for k in kinds])[0]](rng)
        seqs.extend(passes(example.prompt, example.answers, tok))
    seqs = seqs[:size]
    width = max(len(s[0]) for s in seqs)
    span = max(len(s[3]) for s in seqs)
    tokens = torch.tensor([[0] * (width - len(t)) + t for t, _, _, _ in seqs])
    positions = torch.tensor([[0] * (width - len(p)) + p for _, p, _, _ in seqs])
    pad = torch.tensor([width - len(t) for t, _, _, _ in seqs])
    layout = SeqLayout(pad=pad, bidirectional=torch.tensor([b for _, _, b, _ in seqs]))
    # predictions are read from sop onwards: sop predicts the first answer token, ...
    at = torch.tensor([[width - len(t) + b + j if j < len(y) else 0 for j in range(span)] for t, _, b, y in seqs])
    targets = torch.tensor([[y[j] if j < len(y) else -100 for j in range(span)] for _, _, _, y in seqs])
    return tokens, positions, layout, at, targets


def evaluate(model: GLMModel, tok: GLMTokenizer, count: int = 60) -> dict[str, float]:
    engine = Engine(model, tok, GenerationConfig(max_new_tokens=12), max_batch=32)
    scores = {}
    for kind in TASKS:
        cases = held_out(kind, count)
        results = engine.generate([Request(str(i), e.prompt) for i, e in enumerate(cases)])
        right = sum(r.blanks == [a for a in e.answers] for r, e in zip(results, cases))
        scores[kind] = right / len(cases)
    return scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="glm_tp/demo")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    out = prepare_output(args.out, args.force)
    tok_file = train_tokenizer(out)
    sp_size = spm.SentencePieceProcessor(model_file=str(tok_file)).get_piece_size()
    cfg = demo_config(sp_size)
    tok = GLMTokenizer(tok_file, cfg.special, text_offset=0)

    model = GLMModel(cfg, single_process(), torch.float32)
    model.load_state_dict(random_shard(cfg, 1, 0, args.seed, torch.float32))
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rng = random.Random(TRAIN_SEED)
    start = time.time()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        tokens, positions, layout, at, targets = make_batch(rng, tok, args.batch)
        logits = model(tokens, positions, layout, None, logits_at=at, gather=False)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    minutes = (time.time() - start) / 60
    model.requires_grad_(False)

    write_shard(out, "1", 0, {k: v.detach().clone() for k, v in model.state_dict().items()})
    meta = make_metadata(cfg, 1, torch.float32, tokenizer=tok_file.name, tokenizer_offset=0,
                         trained={"steps": args.steps, "batch": args.batch, "minutes": round(minutes, 1)})
    write_latest(out, "1", meta)
    scores = evaluate(model.eval(), tok)
    print(f"trained {args.steps} steps in {minutes:.1f} min; held-out accuracy: "
          + ", ".join(f"{k} {v:.0%}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
