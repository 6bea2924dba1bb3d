"""`load_model`: one call from a checkpoint folder to a ready model, single-process or under torchrun."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from glm_tp.checkpoints.loader import RankLoader
from glm_tp.checkpoints.release import (
    CheckpointError,
    check_files,
    read_metadata,
    recorded_stages,
    stage_folder,
)
from glm_tp.checkpoints.sources import Source, open_source, source_bits
from glm_tp.config import (
    ModelConfig,
    check_kernels,
    check_lm_head,
    default_dtype,
    get_preset,
    parse_dtype,
    parse_quant,
)
from glm_tp.model.glm import GLMModel
from glm_tp.parallel.dist import TPContext, init_distributed
from glm_tp.parallel.pipeline import RankLayout, StageSplit, init_pipeline


def resolve_config(info_cfg: ModelConfig | None, model: str | ModelConfig | None, layers: int | None) -> ModelConfig:
    if isinstance(model, ModelConfig):
        cfg = model
    elif model:
        cfg = get_preset(model)
    elif info_cfg is not None:
        cfg = info_cfg
    else:
        raise CheckpointError("the checkpoint has no glm_tp.json metadata, so its shape is unknown: "
                              "pass model=glm-130b (or the preset it was made with)")
    return cfg.with_layers(layers) if layers else cfg


def load_model(checkpoint: str | os.PathLike, *, model: str | ModelConfig | None = None, layers: int | None = None,
               dtype: str | torch.dtype | None = None, quant: str | int | None = None, device: str | None = None,
               tp: TPContext | None = None, progress: bool = True, kernels: str = "fused",
               lm_head: str = "model", verify: bool = False, pipeline_parallel: int | None = None,
               stage_sizes: list[int] | None = None) -> GLMModel:
    """Load this rank's share of a checkpoint: the GLM-130B release layout with any number of shards, one
    unsharded file, or a Hugging Face clone (ChatGLM-6B; ChatGLM2/3 and GLM-4 in THUDM's or transformers' layout,
    -int4 included), at any TP size that divides the model.

    Single process: `load_model("ckpt")`. Under `torchrun --nproc_per_node N` every rank calls the
    same line and gets its own slice (the process group is set up on first use). kernels: "fused" (the
    fastest quantized matmul the device has), "q8" (CPU: integer kernels with Q8_0 activations, the compiled
    one for decode batches where it is built, numba's above quant.SMALL_ROWS rows), "torch" (torch's fused kernels only) or "dequant" (the reference's
    dequantize-then-matmul). lm_head: "model" (the embedding in the model's dtype) or "int8".
    verify: check every file's SHA-256 against glm_tp.json first (the ranks share the work); file sizes
    are always checked. pipeline_parallel: the ranks form that many stages of tensor-parallel groups
    (parallel/pipeline.py), each loading its stage's layers only; stage_sizes: the layers of each stage
    (default: as even as they go). A checkpoint written per stage (glm-tp-repartition --pp) is loaded with
    its recorded split (pipeline_parallel None takes it), each rank opening only its stage's files; at
    pipeline_parallel=1 it reads as one checkpoint; another split is a one-line error.
    """
    check_kernels(kernels)
    check_lm_head(lm_head)
    tp = tp or init_distributed(device)
    pp, stage_sizes, own = checkpoint_stage(checkpoint, tp, pipeline_parallel, stage_sizes)
    source = open_source(checkpoint, own)
    verify_files(source, tp, verify, progress, own, pp)
    cfg = resolve_config(source.model_config(), model, layers)
    world, stage = tp, None
    if pp > 1:
        split = StageSplit.from_sizes(stage_sizes, cfg.num_layers, pp) if stage_sizes else \
            StageSplit.even(cfg.num_layers, pp)
        tp, stage = init_pipeline(world, pp, split)
    cfg.check_tp(tp.size)
    bits = source_bits(source, cfg.hidden_size)
    wanted = parse_quant(quant)
    torch_dtype = parse_dtype(dtype) if dtype else default_dtype(tp.device)
    net = GLMModel(cfg, tp, torch_dtype, tp.device, quant_bits=bits if wanted is None else wanted, stage=stage,
                   world=world)
    report = RankLoader(net, source, bits).load(progress=progress and world.is_first)
    if report.unexpected and world.is_first:
        warnings.warn(f"{source.root} has {len(report.unexpected)} tensor(s) this model does not use, e.g. "
                      f"{report.unexpected[0]}: ignored")
    net.prepare_kernels(kernels, lm_head)
    return net.eval()


def checkpoint_stage(checkpoint: str | os.PathLike, tp: TPContext, pipeline_parallel: int | None,
                     stage_sizes: list[int] | None) -> tuple[int, list[int] | None, int | None]:
    """The stages to load (pipeline_parallel, stage_sizes) and, for a checkpoint written per stage, this rank's
    stage, whose files are the only ones it reads: such a checkpoint loads with the split it was written for
    (unset: taken from it), or as one checkpoint at pipeline_parallel=1."""
    root = Path(checkpoint).expanduser()
    recorded = recorded_stages(read_metadata(root)) if root.is_dir() else None
    pp = pipeline_parallel or (len(recorded) if recorded else 1)
    sizes = stage_sizes or (recorded if pp > 1 else None)
    if not recorded or pp == 1:
        return pp, sizes, None
    if pp != len(recorded) or list(sizes or []) != recorded:
        asked = f"pipeline_parallel={pp}" if pp != len(recorded) else f"stage_layers={list(sizes or [])}"
        raise CheckpointError(f"{asked}, but {checkpoint} is written per stage for pipeline_parallel="
                              f"{len(recorded)} stage_layers={recorded}: load it with those (or pipeline_parallel=1), "
                              f"or repartition it")
    return pp, sizes, RankLayout.of_world(tp.size, pp).stage_of(tp.rank)


def verify_files(source: Source, tp: TPContext, verify: bool, progress: bool, stage: int | None = None,
                 pp: int = 1) -> None:
    """Sizes always; with verify, each rank hashes its share of the files (of its stage's, for a checkpoint
    written per stage) and every rank learns every problem, so all of them stop with the same line before
    computing anything."""
    folder, rank, ranks = None, tp.rank, tp.size
    if stage is not None:
        folder = f"{source.iteration}/{stage_folder(stage)}"
        layout = RankLayout.of_world(tp.size, pp)
        rank, ranks = layout.tp_rank_of(tp.rank), layout.tp
    problems = check_files(source.root, source.metadata, verify, rank, ranks, progress and tp.is_first, folder)
    if verify:
        found = {name: why for share in tp.all_gather_object(problems) for name, why in share.items()}
        if found:
            raise CheckpointError(found[min(found)])
