"""Random checkpoints written in the release layout, for tests, and a probe of what loading one costs in memory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from glm_tp.checkpoints.release import (
    inspect,
    make_metadata,
    open_shard,
    write_latest,
    write_shard,
)
from glm_tp.checkpoints.synthetic import random_shard
from glm_tp.config import ModelConfig
from tests.support import ROOT


def shards(ckpt: Path) -> list[dict[str, torch.Tensor]]:
    """Every shard of a release-format checkpoint, as its tensors."""
    return [open_shard(p)[0] for p in inspect(ckpt).shards]


def identical(a: Path, b: Path) -> bool:
    """Whether two release-format checkpoints hold the same tensors, bit for bit, in as many shards."""
    sa, sb = shards(a), shards(b)
    return len(sa) == len(sb) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                      for x, y in zip(sa, sb))


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


# run in a fresh process, so that its peak RSS (VmHWM) is this one load's
RSS_PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from glm_tp import SeqLayout, load_model
from glm_tp.model import attention
from glm_tp.parallel.dist import simulated_rank

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

ckpt, dtype, size, rank, forward = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1"
tp = None if size == "-" else simulated_rank(int(size), int(rank))
if forward:  # the CPU kernels' runtime (numba and its compiled code, ~140 MB once, whatever the model) is not loading
    attention.decode_kernel("fused", torch.float32, torch.device("cpu"))
before = status("VmRSS")
model = load_model(ckpt, dtype=dtype, tp=tp, progress=False)
if forward:
    with torch.inference_mode():  # touch every weight, as serving does
        model(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), SeqLayout(torch.tensor([0]), torch.tensor([2])),
              model.new_cache(1, 4))
kept = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": status("VmHWM"), "kept": kept}))
"""


def load_rss(ckpt: Path, dtype: str, rank_of: tuple[int, int] | None = None, forward: bool = False) -> dict[str, int]:
    """Bytes of RSS before loading `ckpt` in `dtype` (as `rank_of` = (rank, size) simulated, or whole), the peak
    RSS after it (and after one forward pass that touches every weight, if `forward`), and the bytes the model
    keeps. Linux only: it reads /proc/self/status."""
    size, rank = (str(rank_of[1]), str(rank_of[0])) if rank_of else ("-", "-")
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(ROOT), str(ckpt), dtype, size, rank, str(int(forward))],
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


def write_clone(dst: Path, layout: str, preset: str = "tiny-chatglm2", *options: str, dtype: str = "fp32",
                seed: int = 0) -> Path:
    """A random Hugging Face clone in `layout` (glm-tp-make-checkpoint --layout: hf, chatglm2, glm-hf), with the
    tokenizer files such a clone holds; `options`: more of its flags (--quant int4, --chat chatglm3, --files 2)."""
    from glm_tp.cli import make_checkpoint
    make_checkpoint.main([str(dst), "--preset", preset, "--layout", layout, "--dtype", dtype, "--seed", str(seed),
                          *options])
    return dst
