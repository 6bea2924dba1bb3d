"""Shared fixtures: random checkpoints are built once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from glm_tp.checkpoint import make_metadata, write_latest, write_shard  # noqa: E402
from glm_tp.config import PRESETS, ModelConfig  # noqa: E402
from glm_tp.synthetic import random_shard  # noqa: E402


def write_random_checkpoint(dst: Path, cfg: ModelConfig, tp: int, dtype: torch.dtype, seed: int = 0,
                            metadata: bool = True) -> Path:
    for rank in range(tp):
        write_shard(dst, "1", rank, random_shard(cfg, tp, rank, seed, dtype))
    write_latest(dst, "1", make_metadata(cfg, tp, dtype, seed=seed) if metadata else None)
    return dst


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same random fp32 'tiny' model cut for TP 1, 2 and 4."""
    root = tmp_path_factory.mktemp("tiny")
    return {tp: write_random_checkpoint(root / f"tp{tp}", PRESETS["tiny"], tp, torch.float32) for tp in (1, 2, 4)}


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
    "monday tuesday wednesday thursday friday saturday sunday",
    "january february march april may june july august",
    "glm fills blanks in the middle of a text and at its end",
    "tensor parallel ranks each hold one shard of every layer",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sentencepiece model (offset 0) whose ids fit the 'tiny' preset's text range."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    text = root / "corpus.txt"
    text.write_text("\n".join(CORPUS * 20) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / "tokenizer"), vocab_size=120,
                                   model_type="unigram", hard_vocab_limit=False, user_defined_symbols=["<n>"],
                                   minloglevel=2)
    return root / "tokenizer.model"
