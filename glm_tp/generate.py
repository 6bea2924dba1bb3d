"""The entry point: `torchrun --nproc_per_node N -m glm_tp.generate [key=value ...]` (or python -m for one rank).

Every rank loads its shard; rank 0 runs the front end (TTY or a JSONL batch job) and the other ranks
follow its commands. Configuration is hydra's, from configs/ (see configs/generate.yaml for the keys).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .api import load_model, parse_quant, resolve_config
from .checkpoint import CheckpointError, inspect
from .config import parse_dtype
from .dist import init_distributed, shutdown
from .generation import Engine
from .requests import GenerationConfig
from .planner import GiB, Plan, refusal
from .serve import Coordinator, worker_loop
from .tokenizer import TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(ROOT / "configs")


class UsageError(ValueError):
    """A bad setting, reported as one line."""


def resolve_path(value: str) -> Path:
    """Relative paths are taken from the working directory, else from the glm-tp source tree (bundled data)."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or not (ROOT / p).exists():
        return p
    return ROOT / p


def make_plan(cfg: DictConfig, tp_size: int, device_type: str) -> Plan:
    """The memory plan for this run; with a model preset it needs no checkpoint on disk."""
    checkpoint = resolve_path(cfg.checkpoint)
    info = inspect(checkpoint) if cfg.model is None or (checkpoint / "latest").exists() else None
    model_cfg = resolve_config(info.model_config() if info else None, cfg.model, None)
    bits = parse_quant(cfg.quant)
    bits = ((info.quant_bits if info else 0) or 0) if bits is None else bits
    dtype = parse_dtype(cfg.dtype) if cfg.dtype else (torch.float16 if device_type == "cuda" else torch.float32)
    return Plan(model_cfg, tp_size, torch.tensor([], dtype=dtype).element_size(), bits, int(cfg.batch_size),
                int(cfg.max_len or model_cfg.max_seq_len))


def device_bytes(cfg: DictConfig, device: torch.device) -> float | None:
    if cfg.device_memory_gib:
        return float(cfg.device_memory_gib) * GiB
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return None


def load_tokenizer_for(cfg: DictConfig, checkpoint: Path, special):
    if cfg.tokenizer:
        return load_tokenizer(resolve_path(cfg.tokenizer), special)
    meta = inspect(checkpoint).metadata or {}
    if "tokenizer" in meta:
        return load_tokenizer(checkpoint / meta["tokenizer"], special, meta.get("tokenizer_offset"))
    return load_tokenizer(checkpoint, special)


def run(cfg: DictConfig) -> int:
    gen = GenerationConfig().updated(**OmegaConf.to_container(cfg.generation))
    if cfg.plan:
        ranks = int(cfg.ranks or os.environ.get("WORLD_SIZE", "1"))
        plan = make_plan(cfg, ranks, "cuda" if cfg.device == "cuda" else "cpu")
        memory = float(cfg.device_memory_gib) * GiB if cfg.device_memory_gib else None
        print(plan.table(memory))
        if memory is not None and not plan.fits(memory):
            print(refusal(plan, memory))
        return 0
    tp = init_distributed(cfg.device, timeout_s=float(cfg.timeout_s))
    if cfg.ranks and int(cfg.ranks) != tp.size:
        raise UsageError(f"this hardware preset runs {cfg.ranks} ranks but {tp.size} were started: "
                         f"use torchrun --nproc_per_node {cfg.ranks}, or set ranks=null")
    memory = device_bytes(cfg, tp.device)
    if memory is not None:
        plan = make_plan(cfg, tp.size, tp.device.type)
        if not plan.fits(memory):
            raise UsageError(refusal(plan, memory))
    checkpoint = resolve_path(cfg.checkpoint)
    model = load_model(checkpoint, model=cfg.model, dtype=cfg.dtype, quant=cfg.quant, tp=tp, kernels=cfg.kernels,
                       lm_head=cfg.lm_head)
    tokenizer = load_tokenizer_for(cfg, checkpoint, model.cfg.special)
    engine = Engine(model, tokenizer, gen, max_batch=int(cfg.batch_size), max_len=int(cfg.max_len) if cfg.max_len else None)
    if not tp.is_first:
        worker_loop(tp, engine)
        return 0
    coordinator = Coordinator(tp, engine)
    try:
        if cfg.input == "interactive":
            from .frontends.tty import run_tty
            run_tty(coordinator, color=str(cfg.color))
        else:
            from .frontends.batch import run_batch
            run_batch(coordinator, resolve_path(cfg.input), Path(cfg.output) if cfg.output else None)
    finally:
        coordinator.shutdown()
    return 0


@hydra.main(config_path=CONFIG_DIR, config_name="generate", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    rank = os.environ.get("RANK", "0")
    try:
        code = run(cfg)
    except (CheckpointError, TokenizerError, UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (RuntimeError, ConnectionError) as e:  # a lost rank surfaces as a failed collective
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error on rank {rank}: lost contact with the other ranks ({first}); shutting down", file=sys.stderr)
        code = 1
    shutdown()
    if code:
        sys.exit(code)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
