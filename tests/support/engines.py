"""Engines for tests: a checkpoint (or a model already loaded) and a tokenizer file, in one call."""
from __future__ import annotations

import os
from typing import Any

from glm_tp import load_model
from glm_tp.engine.core import Engine
from glm_tp.model.glm import GLMModel
from glm_tp.parallel.dist import TPContext
from glm_tp.text.tokenizer import load_tokenizer


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
