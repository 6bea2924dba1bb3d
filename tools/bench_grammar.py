"""The cost of structured output per step on CPU: llguidance and xgrammar side by side.

For a JSON schema and two regular expressions, on a 65k sentencepiece-shaped vocabulary (ChatGLM2/3's size:
word pieces with a word boundary, 256 byte fallback pieces, a few control pieces) and a 151k byte-level BPE
one (GLM-4's size: byte strings, CJK characters split across pieces), both synthetic and seeded: the time to
build each library's vocabulary, to compile each grammar, and per step to compute the next-token mask
(the library's bitmask, and the bool mask the sampler applies) while a seeded walk picks a random allowed
token, until the grammar ends. Prints a markdown table (docs/performance.md, "Structured output").

    python -m tools.bench_grammar [--walks 20] [--libraries llguidance,xgrammar] [--engine]

--engine adds the engine's view: a small random causal model on the 151k vocabulary, 8 rows decoding
--steps tokens each, none, one or all of them under the JSON schema: the time per step and the sampler's
grammar time per step (what /metrics reports), so that a step's cost with and without grammars compares.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from glm_tp.config import GLM4_SPECIALS, PRESETS
from glm_tp.engine.constraints import Grammar, JsonValue, Regex
from glm_tp.engine.core import Engine
from glm_tp.engine.grammar import JSON_STYLE, Grammars
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.model.glm import GLMModel
from glm_tp.parallel.dist import single_process
from glm_tp.text.bpe import BPETokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
GRAMMARS: dict[str, Grammar] = {
    "json schema": JsonValue(SCHEMA),
    "regex (email)": Regex(r"[a-z]{3,12}\.[a-z]{2,10}@[a-z]{3,10}\.(com|org|net)"),
    "regex (free text)": Regex(r"[A-Za-z ,.]{1,120}"),
}
LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def sentencepiece_vocab(size: int, rng: random.Random) -> list[bytes | None]:
    """ChatGLM2-shaped: 3 control pieces, 256 byte pieces, then word pieces (half with a word boundary,
    which is a space in bytes), some CJK characters and punctuation."""
    pieces: list[bytes | None] = [None, None, None] + [bytes([b]) for b in range(256)]
    return _fill(pieces, size, rng, lambda: (" " if rng.random() < 0.5 else "") + _word(rng))


def byte_level_vocab(size: int, rng: random.Random) -> list[bytes | None]:
    """GLM-4-shaped: 256 single bytes, then byte strings: words with or without a leading space, CJK runs and
    pieces of CJK characters (ending inside a character), digits and punctuation runs."""
    pieces: list[bytes | None] = [bytes([b]) for b in range(256)]

    def piece() -> str | bytes:
        r = rng.random()
        if r < 0.15:
            return "".join(rng.choices(CJK, k=rng.randint(1, 3))).encode()[: rng.randint(2, 9)]
        if r < 0.25:
            return "".join(rng.choices(' {}[]":,.!?-_\n', k=rng.randint(2, 4)))
        return (" " if rng.random() < 0.6 else "") + _word(rng)
    return _fill(pieces, size, rng, piece)


def _word(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return "".join(rng.choices(CJK, k=rng.randint(1, 2)))
    if rng.random() < 0.05:
        return str(rng.randint(0, 999))
    word = "".join(rng.choices(LETTERS, k=rng.randint(2, 10)))
    return word.capitalize() if rng.random() < 0.1 else word


def _fill(pieces: list[bytes | None], size: int, rng: random.Random, make: Callable[[], str | bytes]) -> list:
    seen = {p for p in pieces if p}
    while len(pieces) < size - 8:  # the last ids are special tokens (eop among them), as the models have
        p = make()
        p = p.encode() if isinstance(p, str) else p
        if p and p not in seen:
            seen.add(p)
            pieces.append(p)
    return pieces + [None] * (size - len(pieces))


@dataclass
class Figures:
    vocab_s: float = 0.0
    compile_s: dict[str, float] = field(default_factory=dict)
    mask_us: dict[str, list[float]] = field(default_factory=dict)   # the library's bitmask, per step
    bool_us: dict[str, list[float]] = field(default_factory=dict)   # up to the bool mask the sampler applies


class Pieces:
    """A stand-in tokenizer: just the bytes of each id."""

    def __init__(self, pieces: list[bytes | None]):
        self.pieces = pieces

    def token_bytes(self, vocab_size: int) -> list[bytes | None]:
        return self.pieces[:vocab_size]


def unpack(words: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(words.view(np.uint8), bitorder="little")[:size].view(np.bool_))


def bench_llguidance(pieces: list[bytes | None], walks: int, seed: int) -> Figures:
    end = len(pieces) - 1
    grammars, fig = Grammars(Pieces(pieces), len(pieces), end), Figures()
    start = time.perf_counter()
    grammars.tokenize("")  # builds the vocabulary
    fig.vocab_s = time.perf_counter() - start
    for name, grammar in GRAMMARS.items():
        start = time.perf_counter()
        factory = grammars.factory(grammar)
        fig.compile_s[name] = time.perf_counter() - start
        fig.mask_us[name], fig.bool_us[name] = [], []
        for w in range(walks):
            constraint, rng = factory(), random.Random(seed + w)
            while not constraint.finished():
                t0 = time.perf_counter()
                constraint.matcher.unsafe_compute_mask_ptr(constraint.words.ctypes.data, constraint.words.nbytes)
                t1 = time.perf_counter()
                np.bitwise_and(constraint.words, constraint.text, out=constraint.words)
                allowed = unpack(constraint.words, len(pieces))
                t2 = time.perf_counter()
                fig.mask_us[name].append(1e6 * (t1 - t0))
                fig.bool_us[name].append(1e6 * (t2 - t0))
                token = _pick(allowed, rng, constraint.can_end())
                if token is None:
                    break
                constraint.advance(token)
    return fig


def bench_xgrammar(pieces: list[bytes | None], walks: int, seed: int) -> Figures:
    import xgrammar as xgr

    fig, end = Figures(), len(pieces) - 1
    start = time.perf_counter()
    info = xgr.TokenizerInfo([p or b"" for p in pieces], xgr.VocabType.RAW, vocab_size=len(pieces),
                             stop_token_ids=[end])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    fig.vocab_s = time.perf_counter() - start
    text = np.packbits(np.array([bool(p) for p in pieces] + [False] * (-len(pieces) % 32), dtype=np.uint8),
                       bitorder="little").view(np.int32)
    for name, grammar in GRAMMARS.items():
        start = time.perf_counter()
        if isinstance(grammar, JsonValue):
            compiled = compiler.compile_json_schema(json.dumps(grammar.schema), any_whitespace=False,
                                                    separators=(JSON_STYLE["item_separator"],
                                                                JSON_STYLE["key_separator"]))
        else:
            compiled = compiler.compile_regex(grammar.pattern)
        fig.compile_s[name] = time.perf_counter() - start
        fig.mask_us[name], fig.bool_us[name] = [], []
        bitmask = xgr.allocate_token_bitmask(1, len(pieces))
        for w in range(walks):
            matcher, rng = xgr.GrammarMatcher(compiled), random.Random(seed + w)
            while True:
                t0 = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                t1 = time.perf_counter()
                words = bitmask[0].numpy()
                can_end = bool((int(words[end >> 5]) >> (end & 31)) & 1)
                np.bitwise_and(words, text, out=words)
                allowed = unpack(words, len(pieces))
                t2 = time.perf_counter()
                fig.mask_us[name].append(1e6 * (t1 - t0))
                fig.bool_us[name].append(1e6 * (t2 - t0))
                token = _pick(allowed, rng, can_end)
                if token is None:
                    break
                assert matcher.accept_token(token)
    return fig


def _pick(allowed: torch.Tensor, rng: random.Random, can_end: bool) -> int | None:
    """A random allowed token, or None (the end) where the grammar may end: a model that ends when it can
    about one time in four, which keeps the walks near the grammars' typical length."""
    ids = allowed.nonzero().flatten()
    if not len(ids) or (can_end and rng.random() < 0.25):
        return None
    return int(ids[rng.randrange(len(ids))])


def _row(library: str, vocab: str, fig: Figures, name: str) -> str:
    steps = fig.mask_us[name]
    q = statistics.quantiles(steps, n=100) if len(steps) > 1 else steps * 99
    return (f"| {library} | {vocab} | {name} | {1e3 * fig.vocab_s:.0f} | {1e3 * fig.compile_s[name]:.1f} | "
            f"{statistics.mean(steps):.0f} | {q[49]:.0f} | {q[98]:.0f} | {statistics.mean(fig.bool_us[name]):.0f} "
            f"| {len(steps)} |")


def engine_on(pieces: list[bytes | None]) -> Engine:
    """A 2-layer random causal model (tiny-chatglm2's shape) whose vocabulary is `pieces`' text then GLM-4's
    special tokens, with a longest-piece encoder."""
    text = [p for p in pieces if p]
    names = {len(text) + k: n for k, n in enumerate(GLM4_SPECIALS)}
    encoder = Grammars(Pieces(text), len(text), 0)
    tok = BPETokenizer(text, encoder.tokenize, names)
    cfg = dataclasses.replace(PRESETS["tiny-chatglm2"], vocab_size=len(text) + len(names), special=tok.special,
                              max_seq_len=256)
    model = GLMModel(cfg, single_process(), torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "layernorm" in name else p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02,
                                                               generator=gen)
    return Engine(model.eval(), tok, max_batch=8)


def bench_engine(pieces: list[bytes | None], steps: int, rounds: int) -> list[str]:
    """Rows of the engine table: 8 sampled rows of `steps` tokens, 0, 1 or 8 of them under the JSON schema
    (a constrained row that completes its JSON ends early); the rounds alternate, each figure its best."""
    engine = engine_on(pieces)
    config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, strategy="sample")
    engine.generate([Request("warm", "the quick", config=config, grammar=GRAMMARS["json schema"])])  # compiles
    best: dict[int, tuple[float, int, float, int]] = {}
    timing = engine.sampler.grammar
    for _ in range(rounds):
        for constrained in (0, 1, 8):
            requests = [Request(f"r{i}", "the quick brown fox", config=config.updated(seed=i),
                                grammar=GRAMMARS["json schema"] if i < constrained else None) for i in range(8)]
            seconds, counted, start = timing.seconds, timing.steps, time.perf_counter()
            tokens = sum(r.completion_tokens for r in engine.generate(requests))
            wall = time.perf_counter() - start
            if constrained not in best or wall < best[constrained][0]:
                best[constrained] = (wall, tokens, timing.seconds - seconds, timing.steps - counted)
    rows = []
    for constrained, (wall, tokens, seconds, counted) in best.items():
        per_step = 1e3 * seconds / counted if counted else 0.0
        rows.append(f"| {constrained} of 8 | {tokens} | {1e3 * wall / steps:.1f} | {counted} | {per_step:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=20, help="random walks per grammar")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--libraries", default="llguidance,xgrammar")
    parser.add_argument("--engine", action="store_true", help="also the engine's step time with grammar rows")
    parser.add_argument("--steps", type=int, default=48, help="tokens per row in --engine")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds in --engine")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    vocabs = {"65k sentencepiece": sentencepiece_vocab(65024, rng), "151k byte-level": byte_level_vocab(151552, rng)}
    benches = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar}
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads 1\n")
    libraries = [name for name in args.libraries.split(",") if name]
    if libraries:
        print("| library | vocabulary | grammar | vocab build ms | compile ms | mask µs mean | p50 | p99 "
              "| to bool mask µs mean | steps |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for library in libraries:
        for vocab, pieces in vocabs.items():
            fig = benches[library](pieces, args.walks, args.seed)
            for name in GRAMMARS:
                print(_row(library, vocab, fig, name), flush=True)
    if args.engine:
        print("\n| rows under the JSON schema | tokens | ms per step (wall / steps) | steps with a grammar row "
              "| grammar ms per such step |")
        print("|---|---|---|---|---|")
        for row in bench_engine(vocabs["151k byte-level"], args.steps, args.rounds):
            print(row, flush=True)


if __name__ == "__main__":
    main()
