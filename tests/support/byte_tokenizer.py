"""A small sentencepiece model with byte fallback for structured output: JSON's punctuation and any character
can be written, it has GLM's newline piece, and its ids fit the tiny presets' text range."""
from __future__ import annotations

from pathlib import Path

from tests.support.checkpoints import CORPUS

JSON_LINES = ['{"name": "fox", "age": 12, "ok": true}', '{"a": [1, 2.5, null], "b": {"c": "d"}}',
              "x = 1 + 2; y = [3, 4]"]


def write_byte_tokenizer(root: Path, symbols: tuple[str, ...] = ("<n>",)) -> Path:
    """symbols: its user-defined pieces (ChatGLM-6B's whitespace pieces: "<|tab|>", "<|blank_2|>", ...)."""
    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text("\n".join((CORPUS + JSON_LINES) * 20) + "\n")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   user_defined_symbols=list(symbols), hard_vocab_limit=False, minloglevel=2)
    return root / "tokenizer.model"
