"""Random but well-behaved weights, deterministic per (seed, tensor name) and independent of TP.

Scaled like a trained model so logits are finite and far from uniform: unit-gain linears
(std 1/sqrt(fan_in)), LayerNorm gains near 1, small biases, and an embedding whose tied LM head
gives logits with a standard deviation of a few units.
"""
from __future__ import annotations

import zlib

import torch

from glm_tp.config import ModelConfig
from glm_tp.parallel.partition import full_shapes, layout_for, split

BLOCK = 1 << 24  # values drawn at a time: a large tensor never exists in fp32 at once


def _scaled(name: str, t: torch.Tensor, fan_in: int, hidden_size: int) -> torch.Tensor:
    if "layernorm" in name:
        return 1.0 + 0.1 * t if name.endswith("weight") else 0.05 * t
    if name.endswith("bias"):
        return 0.02 * t
    if "word_embeddings" in name:
        return t * (3.0 / hidden_size ** 0.5)
    return t / fan_in ** 0.5


def random_tensor(name: str, shape: tuple[int, ...], seed: int, hidden_size: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full (TP=1) tensor called `name`, drawn in blocks of rows (one block for small tensors)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype)
    row = max(1, out[0].numel()) if out.dim() else 1
    rows = max(1, BLOCK // row)
    for start in range(0, shape[0] if shape else 1, rows):
        block = out[start:start + rows] if shape else out
        block.copy_(_scaled(name, torch.randn(block.shape, generator=gen), shape[-1] if shape else 1, hidden_size))
    return out


def random_shard(cfg: ModelConfig, tp: int, rank: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rank `rank`'s shard of the random model: each full tensor is drawn, cut, and dropped."""
    out = {}
    for name, shape in full_shapes(cfg).items():
        full = random_tensor(name, shape, seed, cfg.hidden_size, dtype)
        out[name] = split(full, layout_for(name, cfg), tp)[rank].clone()
    return out
