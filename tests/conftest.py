"""Shared fixtures: random checkpoints are built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glm_tp.config import PRESETS
from tests.support.checkpoints import CORPUS, write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same random fp32 'tiny' model cut for TP 1, 2 and 4."""
    root = tmp_path_factory.mktemp("tiny")
    return {tp: write_random_checkpoint(root / f"tp{tp}", PRESETS["tiny"], tp, torch.float32) for tp in (1, 2, 4)}


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
