"""Grammars (constraints.py's `Grammar`) enforced with the llguidance library over a model's vocabulary.

Why llguidance (docs/performance.md, "Structured output", has the figures): it compiles any grammar in
milliseconds, where xgrammar precomputes each one over the vocabulary (0.2-9 s for a regex on a 65k-151k
vocabulary); its mask, 0.1-5 ms a step on CPU, is about 1 % or less of a 6B model's CPU decode step; it checks a
grammar without a vocabulary (the front end's 400); and it is one wheel with no dependencies (xgrammar pulls
in transformers and triton). It is an optional extra: `pip install 'glm-tp[grammar]'`.

A `Grammar` becomes one Lark grammar (JSON values as llguidance's `%json` under the schema, regular
expressions and literals as lexemes). Each distinct grammar compiles once (a bounded cache of matchers);
each fill gets a copy of the compiled matcher. The vocabulary is every id in [0, vocab_size) as its bytes
from the tokenizer (`BaseTokenizer.token_bytes`); ids that are not text are never allowed, and the job's
end tokens are the sampler's (allowed where `can_end()`).
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import json
import re
import threading
import time
from types import ModuleType

import numpy as np
import torch

from glm_tp.engine.constraints import (
    ConstraintError,
    ConstraintFactory,
    Grammar,
    JsonValue,
    Literal,
    OneOf,
    Regex,
    Sequence,
)
from glm_tp.engine.sampler import GrammarTime
from glm_tp.text.base import BaseTokenizer

INSTALL = "pip install 'glm-tp[grammar]'"
CACHE_SIZE = 64  # distinct grammars kept compiled
# JSON as json.dumps writes it: no free whitespace, so that a model cannot pad a value forever
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
NO_TOKEN = ("NoExtension", "NoExtensionBias")
UNSPELLABLE = ("no token of the model's vocabulary continues its grammar here (the format asks for characters the "
               "tokenizer cannot write)")  # llguidance's errors when no token may come next


def library() -> ModuleType:
    """llguidance, or the one line that says how to install it."""
    try:
        return importlib.import_module("llguidance")
    except ImportError:
        raise ConstraintError(f"structured output needs the llguidance library: {INSTALL}") from None


def available() -> bool:
    """Whether structured output can run here (the grammar extra is installed)."""
    return importlib.util.find_spec("llguidance") is not None


def to_lark(grammar: Grammar) -> str:
    """The Lark grammar of a `Grammar`: a rule per part, `start` the whole."""
    rules: list[str] = []

    def rule(g: Grammar) -> str:
        at = len(rules)
        rules.append("")  # the place of this rule; its body may add rules after it
        rules[at] = f"r{at}: {body(g)}"
        return f"r{at}"

    def body(g: Grammar) -> str:
        if isinstance(g, JsonValue):
            schema = dict(g.schema) if g.schema is not None else {"type": "object"}
            return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})
        if isinstance(g, Regex):
            return f"/{library().regex_to_lark(g.pattern)}/"
        if isinstance(g, Literal):
            return json.dumps(g.text, ensure_ascii=False)
        if isinstance(g, Sequence) and g.parts:
            return " ".join(rule(p) for p in g.parts)
        if isinstance(g, OneOf) and g.options:
            return " | ".join(rule(o) for o in g.options)
        raise ConstraintError(f"not a grammar: {g!r}")

    start = body(grammar)
    return "\n".join([f"start: {start}", *rules]) + "\n"


def reason(message: str) -> str:
    """The library's error in one line: its first, without the position, and the parser's own error line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0]) if lines else "the grammar does not compile"
    detail = next((line for line in lines[1:] if line.startswith("error:")), "")
    return f"{first} {detail}".strip()


def check(grammar: Grammar) -> None:
    """Raises ConstraintError with the library's reason when `grammar` cannot compile (a bad schema or
    regex); needs no vocabulary, so a front end can check a request before it reaches the engine."""
    llg = library()
    error, messages = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_lark(to_lark(grammar)))
    if error:
        raise ConstraintError(reason(messages[0] if messages else ""))


class GrammarConstraint:
    """One fill's matcher: the ids it allows next, the tokens it was given, whether it may end."""

    def __init__(self, matcher: object, vocab_size: int, text: np.ndarray, timing: GrammarTime):
        """text: the vocabulary's text ids as bits (int32 words, the library's mask layout); timing: where the
        time of `advance` adds up (the sampler times the masks)."""
        self.matcher, self.vocab_size, self.text, self.timing = matcher, vocab_size, text, timing
        self.words = np.zeros_like(text)

    def mask(self) -> torch.Tensor:
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        self._fail_if_error()
        np.bitwise_and(self.words, self.text, out=self.words)  # its end token is the sampler's to allow
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token: int) -> None:
        start = time.perf_counter()
        try:
            if not (int(self.text[token >> 5]) >> (token & 31)) & 1 or not self.matcher.consume_token(token):
                if "forced bytes" in (self.matcher.get_error() or ""):  # text the format needs, no token writes
                    raise ConstraintError(UNSPELLABLE)
                raise ConstraintError(f"token {token} does not fit the grammar")
        finally:
            self.timing.seconds += time.perf_counter() - start

    def can_end(self) -> bool:
        return self.matcher.is_accepting()

    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def _fail_if_error(self) -> None:
        if not self.matcher.is_error():
            return
        error = self.matcher.get_error()
        if error.split("\n", 1)[0].strip() in NO_TOKEN:
            raise ConstraintError(UNSPELLABLE)
        raise ConstraintError(f"the grammar failed: {reason(error)}")


class Grammars:
    """A model's grammar compiler: its vocabulary (built on first use), the compiled grammars (bounded),
    a fresh constraint per fill. Thread-safe: requests are accepted on the front end's threads."""

    def __init__(self, tokenizer: BaseTokenizer, vocab_size: int, end_token: int, timing: GrammarTime | None = None):
        """timing: where the constraints' time adds up (the engine's: its sampler's)."""
        self.tok, self.vocab_size, self.end_token = tokenizer, vocab_size, end_token
        self.timing = timing or GrammarTime()
        self._lock = threading.Lock()
        self._vocab: object | None = None
        self._tokens: _Tokens | None = None
        self._text: np.ndarray | None = None
        self._compiled: collections.OrderedDict[str, object] = collections.OrderedDict()

    def factory(self, grammar: Grammar) -> ConstraintFactory:
        template = self.compiled(grammar)
        size, text, timing = self.vocab_size, self._text, self.timing
        return lambda: GrammarConstraint(template.deep_copy(), size, text, timing)

    def compiled(self, grammar: Grammar) -> object:
        """The compiled matcher of `grammar` (the cache's, or compiled now); raises ConstraintError."""
        lark = to_lark(grammar)
        with self._lock:
            if lark in self._compiled:
                self._compiled.move_to_end(lark)
                return self._compiled[lark]
            llg, vocab = library(), self._vocabulary()
            matcher = llg.LLMatcher(vocab, llg.LLMatcher.grammar_from_lark(lark), log_level=0)
            if matcher.is_error():
                raise ConstraintError(reason(matcher.get_error()))
            self._compiled[lark] = matcher
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
            return matcher

    def _vocabulary(self) -> object:
        if self._vocab is None:
            pieces = self.tok.token_bytes(self.vocab_size)
            if not any(pieces):
                raise ConstraintError("structured output needs the model's tokenizer: this run has none")
            bits = np.zeros(32 * ((self.vocab_size + 31) // 32), dtype=np.uint8)
            bits[: len(pieces)] = [bool(p) for p in pieces]
            self._text = np.packbits(bits, bitorder="little").view(np.int32)
            self._tokens = _Tokens(pieces, self.end_token)
            self._vocab = library().LLTokenizer(library().TokenizerWrapper(self._tokens))
        return self._vocab

    def tokenize(self, text: str) -> list[int]:
        """`text` in the vocabulary's pieces, longest first (what the grammar's forced text is written in)."""
        with self._lock:
            self._vocabulary()
        return self._tokens(text)


class _Tokens:
    """What llguidance reads from a tokenizer: each id's bytes, the special ids, and a tokenization of bytes
    into them (longest piece first: the model's encoder may add a word boundary the bytes do not have)."""

    def __init__(self, pieces: list[bytes | None], end_token: int):
        self.tokens = [p or b"" for p in pieces]
        self.special_token_ids = [i for i, p in enumerate(pieces) if not p]
        self.eos_token_id, self.bos_token_id = end_token, None
        self._ids: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            if p:
                self._ids.setdefault(p, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, data: str | bytes) -> list[int]:
        data = data.encode("utf-8") if isinstance(data, str) else data
        ids, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                if (i := self._ids.get(data[at:at + size])) is not None:
                    ids.append(i)
                    at += size
                    break
            else:  # a byte no piece spells: the rest cannot be written
                return ids
        return ids

