"""Checks of a run's settings (the keys of glm_tp/configs/generate.yaml) before anything loads.

Every bad value is one `UsageError` line that names the key and what it may be, so a typo costs a
second instead of a model load or a traceback from deep inside torch.
"""
from __future__ import annotations

import difflib
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from glm_tp.config import (
    KERNELS,
    LM_HEADS,
    ModelConfig,
    check_choice,
    parse_dtype,
    parse_quant,
)
from glm_tp.engine.types import GenerationConfig

PACKAGE = Path(__file__).resolve().parents[1]  # the glm_tp folder, in a checkout or installed
CONFIG_DIR = PACKAGE / "configs"  # hydra's configs ship inside the package
DEMO = PACKAGE / "demo"  # the bundled demo model
CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "color": ("auto", "always", "never"),
    "kernels": KERNELS,
    "lm_head": LM_HEADS,
}


class UsageError(ValueError):
    """A bad setting, reported as one line."""


GROUPS = ("preset", "hardware", "precision")  # the config groups of generate.yaml's defaults


def check_overrides(args: list[str]) -> None:
    """Command-line `key=value` overrides name keys that exist: a top-level `max_new_tokens=2` (or
    `+max_new_tokens=2`, which hydra would add and nothing would read) is refused with the key it meant."""
    known = OmegaConf.load(CONFIG_DIR / "generate.yaml")
    nested = {f"{section}.{key}" for section in ("server", "generation") for key in known[section]}
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" not in arg or arg.startswith("-") or key.split(".")[0] in (*GROUPS, "hydra"):
            continue
        if key in known and key not in ("server", "generation") or key in nested:
            continue
        meant = [k for k in nested if k.endswith("." + key)] or difflib.get_close_matches(key, [*known, *nested], 1)
        hint = f": did you mean {meant[0]}={arg.split('=', 1)[1]}?" if meant else ""
        raise UsageError(f"unknown setting {key!r}{hint} (glm_tp/configs/generate.yaml lists the keys)")


def resolve_path(value: str) -> Path:
    """Relative paths are the user's, from the working directory. One that is not there and names the
    package's own files (glm_tp/demo/...) is taken from the package, so the defaults work from any folder."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or p.parts[:1] != (PACKAGE.name,):
        return p
    bundled = PACKAGE.parent / p
    return bundled if bundled.exists() else p


def _whole(key: str, value: Any, minimum: int, optional: bool = False, maximum: int | None = None) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < minimum or (maximum is not None and value > maximum):
        unset = " (or null)" if optional else ""
        span = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise UsageError(f"{key}={value!r}: must be a whole number {span}{unset}")
    return int(value)


def _positive(key: str, value: Any, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UsageError(f"{key}={value!r}: must be a finite number > 0" + (" (or null)" if optional else ""))
    return float(value)


def _parsed(key: str, value: Any, parse: Callable[[Any], object]) -> None:
    """The option's own check, its message as one `key=value: what it may be` line."""
    try:
        parse(value)
    except ValueError as e:
        raise UsageError(f"{key}={value!r}: {str(e).split(': ', 1)[-1]}") from None


def check_config(cfg: DictConfig) -> GenerationConfig:
    """Check every run setting that needs no model; returns the default generation settings."""
    for key, allowed in CHOICES.items():
        _parsed(key, cfg[key], partial(check_choice, key, allowed=allowed))
    _whole("batch_size", cfg.batch_size, 1)
    _whole("max_len", cfg.max_len, 2, optional=True)  # at least a token and its answer
    _whole("prefix_cache_tokens", cfg.prefix_cache_tokens, 0, optional=True, maximum=1 << 32)  # 0: off, null: automatic
    _whole("ranks", cfg.ranks, 1, optional=True)
    _whole("pipeline_parallel", cfg.pipeline_parallel, 1, maximum=1024)  # each stage holds at least one layer
    check_stage_layers(cfg.stage_layers)
    lanes = _whole("pipeline_lanes", cfg.pipeline_lanes, 1, optional=True, maximum=1024)
    if lanes is not None and lanes > cfg.pipeline_parallel:
        raise UsageError(f"pipeline_lanes={lanes}: must be at most pipeline_parallel={cfg.pipeline_parallel} "
                         f"(one batch in flight per stage), or null")
    _positive("timeout_s", cfg.timeout_s)
    _positive("device_memory_gib", cfg.device_memory_gib, optional=True)
    for key in ("plan", "verify"):
        if not isinstance(cfg[key], bool):
            raise UsageError(f"{key}={cfg[key]!r}: use true or false")
    for key, parse in (("quant", parse_quant), ("dtype", parse_dtype)):
        if cfg[key] is not None:
            _parsed(key, cfg[key], parse)
    if cfg.input == "http":
        check_server(cfg.server)
    try:
        return GenerationConfig().updated(**OmegaConf.to_container(cfg.generation))
    except ValueError as e:
        raise UsageError(str(e).replace("generation setting '", "generation.").replace("':", ":", 1)) from None


def check_stage_layers(value: Any) -> list[int] | None:
    """stage_layers: null, or the layers of each pipeline stage as a list of whole numbers >= 1 (that they add
    up to the model's layers and match pipeline_parallel is checked with the model)."""
    if value is None:
        return None
    sizes = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise UsageError(f"stage_layers={value!r}: must be null or a list of whole numbers >= 1, one per "
                         f"pipeline stage, e.g. stage_layers=[16,19,19,16]")
    return sizes


def check_server(server: DictConfig) -> None:
    """input=http: the server's keys (server.*)."""
    if _whole("server.port", server.port, 0) > 65535:
        raise UsageError(f"server.port={server.port!r}: must be a port number 0..65535 (0: any free port)")
    for key in ("host", "api_key", "model_name"):
        value = server[key]
        if not (value is None and key != "host") and not (isinstance(value, str) and value):
            raise UsageError(f"server.{key}={value!r}: must be a non-empty string (quote a number: "
                             f"server.{key}='\"123\"')")
    _whole("server.max_waiting", server.max_waiting, 1)
    _positive("server.request_timeout_s", server.request_timeout_s)
    _positive("server.read_timeout_s", server.read_timeout_s)
    _whole("server.retry_after_s", server.retry_after_s, 0)
    _whole("server.max_body_bytes", server.max_body_bytes, 1)


def check_max_len(max_len: int | None, model: ModelConfig, gen: GenerationConfig) -> None:
    if max_len is not None and max_len > model.max_seq_len:
        raise UsageError(f"max_len={max_len} is over the model's maximum of {model.max_seq_len} tokens: "
                         f"use max_len <= {model.max_seq_len}, or leave it unset for the maximum")
    room = (max_len or model.max_seq_len) - 2  # a prompt is at least one token and sop
    if gen.max_new_tokens > room:  # else every request would be refused
        raise UsageError(f"generation.max_new_tokens={gen.max_new_tokens} leaves no room for a prompt in "
                         f"max_len {max_len or model.max_seq_len}: use at most {room}")


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA device: use hardware=cpu (or device=cpu)")
