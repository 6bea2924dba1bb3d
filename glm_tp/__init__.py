"""glm-tp: tensor-parallel inference for GLM-130B-class models."""
from .api import load_model
from .checkpoint import CheckpointError
from .config import PRESETS, ModelConfig
from .model import GLMModel, KVCache, SeqLayout

__all__ = ["load_model", "CheckpointError", "PRESETS", "ModelConfig", "GLMModel", "KVCache", "SeqLayout"]
__version__ = "0.1.0"
