"""Engines for tests: a checkpoint (or a model already loaded) and a tokenizer file, in one call."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from glm_tp import load_model
from glm_tp.config import PRESETS
from glm_tp.engine.core import Engine
from glm_tp.model.glm import GLMModel
from glm_tp.parallel.dist import TPContext
from glm_tp.text.tokenizer import load_tokenizer
from tests.support.checkpoints import write_random_checkpoint


def engine_for(checkpoint_or_model: str | os.PathLike | GLMModel, tokenizer: str | os.PathLike, *,
               tp: TPContext | None = None, quant: str | None = None, dtype: str | None = None, device: str | None = None, **engine: Any) -> Engine:
    """An Engine on `checkpoint_or_model`: a path is loaded (at `tp`, `quant`, `dtype`, `device`, without
    progress bars), anything else is taken as the model (or a stand-in with its `cfg`). The tokenizer gets
    the model's special tokens; `engine` goes to Engine (default, max_batch, cuda_graphs, ...)."""
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        model = load_model(checkpoint_or_model, tp=tp, quant=quant, dtype=dtype, device=device, progress=False)
    else:
        model = checkpoint_or_model
    return Engine(model, load_tokenizer(tokenizer, model.cfg.special), **engine)


def causal_checkpoint(root: Path, tp: int = 1, **changes: Any) -> Path:
    """A random fp32 'tiny-chatglm2' checkpoint (causal, 2 KV groups) cut for `tp` under `root`, written once;
    `changes` replace config fields (e.g. stop_ids, chat_template)."""
    named = "".join(f"-{k}-{''.join(c for c in str(v) if c.isalnum()) or 'none'}" for k, v in sorted(changes.items()))
    dst = root / f"tiny-chatglm2{named}-tp{tp}"
    if not dst.exists():
        cfg = dataclasses.replace(PRESETS["tiny-chatglm2"], **changes)
        write_random_checkpoint(dst, cfg, tp, torch.float32)
    return dst
