"""Random checkpoints written in the release layout, for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from glm_tp.checkpoints.release import make_metadata, write_latest, write_shard
from glm_tp.checkpoints.synthetic import random_shard
from glm_tp.config import ModelConfig


def write_random_checkpoint(dst: Path, cfg: ModelConfig, tp: int, dtype: torch.dtype, seed: int = 0,
                            metadata: bool = True) -> Path:
    for rank in range(tp):
        write_shard(dst, "1", rank, random_shard(cfg, tp, rank, seed, dtype))
    write_latest(dst, "1", make_metadata(cfg, tp, dtype, seed=seed) if metadata else None)
    return dst


# the tiny tokenizer's training text
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
    "monday tuesday wednesday thursday friday saturday sunday",
    "january february march april may june july august",
    "glm fills blanks in the middle of a text and at its end",
    "tensor parallel ranks each hold one shard of every layer",
]
