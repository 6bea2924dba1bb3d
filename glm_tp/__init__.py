"""glm-tp: tensor-parallel inference for GLM-130B-class models."""
import os

# OpenMP threads that spin after each parallel region steal the cores from the next op's threads: torch's
# pool and the CPU kernels' (numba) pool take turns in a decode step, and on a busy machine spinning made
# single ops 10-100x slower. Passive waiting is read when an OpenMP runtime loads, so it is set before
# torch is imported (import glm_tp first, or export OMP_WAIT_POLICY yourself; an explicit value wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from glm_tp.checkpoints.load import load_model  # noqa: E402
from glm_tp.checkpoints.release import CheckpointError
from glm_tp.config import PRESETS, ModelConfig
from glm_tp.model.glm import GLMModel, KVCache, SeqLayout

__all__ = ["load_model", "CheckpointError", "PRESETS", "ModelConfig", "GLMModel", "KVCache", "SeqLayout"]
__version__ = "0.1.0"
