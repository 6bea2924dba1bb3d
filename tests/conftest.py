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
