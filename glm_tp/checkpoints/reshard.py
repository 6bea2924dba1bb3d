"""Rewrite a checkpoint for another TP size and/or precision, one parameter at a time.

Used by glm-tp-repartition and glm-tp-quantize (glm_tp/cli/convert.py). It reads every layout the
loader reads (`sources.open_source`: release shards at any count, one unsharded file, a Hugging Face
folder) and writes release-format shards at any TP size the model divides into: each output slice is
built from the overlapping source parts (`partition.copy_plan`), as the loader builds a rank's
parameters; per pipeline stage (`pp`), each stage's shards hold only the tensors that stage holds
(`pipeline.Stage.holds`, the loader's rule), so a stage's ranks read only its own files. Source files
are memory-mapped, every output shard is written in place (`ShardWriter`), and pages are dropped once
copied, so host RAM holds about one parameter, never the model.

Quantized input: column-parallel weights keep their per-row scales when cut or joined (exact). A
row-parallel weight's scales cover its whole input slice: an output slice that lies within one source
shard keeps that shard's scales (exact, as the loader does); one joined from several shards is
dequantized and quantized again, which is lossy (a warning says so). Asking for other bits
re-quantizes everything.
"""
from __future__ import annotations

import mmap
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from glm_tp.checkpoints.release import (
    LAYOUT_VERSION,
    CheckpointError,
    release_pages,
    shard_name,
    stage_folder,
    write_latest,
)
from glm_tp.checkpoints.slices import (
    full_shape,
    gather,
    gather_dequantized,
    planned_shape,
    release_part,
)
from glm_tp.checkpoints.sources import Part, Source, open_source, source_bits
from glm_tp.config import ModelConfig, parse_dtype
from glm_tp.kernels.formats import quantize_rows
from glm_tp.parallel.partition import (
    QUANTIZED_WEIGHTS,
    Copy,
    Cut,
    Layout,
    copy_plan,
    is_ignored,
    layout_for,
    single_source,
)
from glm_tp.parallel.pipeline import RankLayout, Stage, StageSplit

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class ShardWriter:
    """Writes one shard file tensor by tensor, in the format torch.load(mmap=True) reads.

    torch.save first lays the file out without data (skip_data), then the file is mapped shared and
    each tensor's bytes are copied in as they are produced; the file gets its real name when complete.
    """

    def __init__(self, path: Path, specs: Specs):
        self.path, self.tmp = path, path.with_suffix(".pt.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        layout = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}  # never touched
        with torch.serialization.skip_data():
            torch.save({"module": layout}, self.tmp)
        del layout
        torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
        try:
            self.targets = torch.load(self.tmp, mmap=True, weights_only=True)["module"]
        finally:
            torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
        self.pending = set(specs)

    def write(self, names: Iterable[str], fill: Callable[[dict[str, torch.Tensor]], Any]) -> None:
        """Let `fill` write the named tensors in place (it gets name -> target), then drop their pages."""
        targets = {name: self.targets[name] for name in names}
        fill(targets)
        for name, target in targets.items():
            release_pages(target)  # shared mapping: the bytes stay in the file, the pages leave our RSS
            self.pending.discard(name)

    def close(self) -> int:
        if self.pending:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(self.pending)[:3]}")
        size = sum(t.numel() * t.element_size() for t in self.targets.values())
        del self.targets
        os.replace(self.tmp, self.path)
        return size


@dataclass
class Slice:
    """What one output shard holds of one source tensor: its tensors' shapes and dtypes, known before any
    data is read, and `fill`, which writes them into their targets (name -> tensor)."""

    specs: Specs
    fill: Callable[[dict[str, torch.Tensor]], Any]
    lossy: bool = False


@dataclass
class Report:
    shard_bytes: list[int] = field(default_factory=list)
    lossy: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


class Planner:
    """The `Slice` of every (tensor, output rank): `src_bits` what the source holds, `bits` what to write."""

    def __init__(self, source: Source, tp: int, src_bits: int, bits: int, cfg: ModelConfig | None):
        """cfg: the model's shape, which decides some cuts (None: GLM-130B's rules)."""
        self.source, self.tp, self.src_bits, self.bits, self.cfg = source, tp, src_bits, bits, cfg
        # dequantized weights take the checkpoint's float dtype, which its metadata says the weights have
        self.float_dtype = parse_dtype((source.metadata or {}).get("dtype") or "fp16")

    @property
    def mapped(self) -> bool:
        return self.source.mapped

    def slice(self, name: str, rank: int) -> Slice:
        parts = self.source.parts(name)
        layout = layout_for(name, self.cfg)
        full = full_shape(parts, layout, self.source.cut)
        plan = copy_plan(layout, full, len(parts), self.tp, rank)
        shape = planned_shape(full, plan)
        if not name.endswith(QUANTIZED_WEIGHTS) or not (self.src_bits or self.bits):
            return Slice({name: (shape, parts[0].dtype)}, lambda t: gather(t[name], parts, plan, self.mapped))
        if not self.src_bits:  # a float source: quantize this slice
            return self._quantized(name, shape, parts[0].dtype, lambda v: gather(v, parts, plan, self.mapped))
        if not self.source.has(name + "_scale"):
            raise CheckpointError(f"{self.source.file_of(name)} holds an INT{self.src_bits} {name} without its "
                                  f"{name}_scale: the checkpoint is incomplete (re-copy or re-create it)")
        scales = self.source.parts(name + "_scale")
        if self.bits == self.src_bits:
            exact = self._exact(name, layout, rank, parts, scales, plan)
            if exact is not None:
                return exact
        values = (shape[0], shape[1] * (8 // self.src_bits))  # INT4 holds two values per byte
        return self._quantized(name, values, self.float_dtype, lossy=True, fill_values=lambda v: gather_dequantized(
            v, parts, scales, plan, self.src_bits, self.mapped))

    def _exact(self, name: str, layout: Cut, rank: int, parts: list[Part], scales: list[Part],
               plan: list[Copy]) -> Slice | None:
        """The quantized slice with its scales as they are, or None when a row-parallel slice joins several
        source shards (whose scales differ: it must be quantized again)."""
        shape = planned_shape(full_shape(parts, layout, self.source.cut), plan)
        scale_name = name + "_scale"
        if layout is not Layout.ROW:  # one scale per row: the scales follow their rows
            scale_plan = copy_plan(layout, full_shape(scales, layout, self.source.cut), len(scales), self.tp, rank)
            scale_shape = planned_shape(full_shape(scales, layout, self.source.cut), scale_plan)

            def fill(t: dict[str, torch.Tensor]) -> None:
                gather(t[name], parts, plan, self.mapped)
                gather(t[scale_name], scales, scale_plan, self.mapped)
            return Slice({name: (shape, parts[0].dtype), scale_name: (scale_shape, scales[0].dtype)}, fill)
        src = single_source(plan)
        if src is None:
            return None

        def fill_row(t: dict[str, torch.Tensor]) -> None:  # every row of one source: that source's row scales
            gather(t[name], parts, plan, self.mapped)
            t[scale_name].copy_(scales[src].narrow(0, 0, shape[0]))
            release_part(scales[src], self.mapped)
        return Slice({name: (shape, parts[0].dtype), scale_name: ((shape[0],), scales[src].dtype)}, fill_row)

    def _quantized(self, name: str, values: tuple[int, ...], dtype: torch.dtype,
                   fill_values: Callable[[torch.Tensor], Any], lossy: bool = False) -> Slice:
        """A slice built as float `values` (by `fill_values`), written quantized to `bits` (float when 0)."""
        if not self.bits:
            return Slice({name: (values, dtype)}, lambda t: fill_values(t[name]), lossy)

        def fill(t: dict[str, torch.Tensor]) -> None:
            q, scale = quantize_rows(fill_values(torch.empty(values, dtype=dtype)), self.bits)
            t[name].copy_(q)
            t[name + "_scale"].copy_(scale)
        packed = (values[0], values[1] // (8 // self.bits))
        return Slice({name: (packed, torch.int8), name + "_scale": ((values[0],), torch.float16)}, fill, lossy)


def _check_replicated(name: str, parts: list[Part], cfg: ModelConfig | None, mapped: bool, report: Report) -> None:
    """Replicated tensors are written from source shard 0: say so when the shards' copies differ."""
    if layout_for(name, cfg) is not Layout.REPLICATED or len(parts) == 1:
        return
    if any(not torch.equal(parts[0], p) for p in parts[1:]):
        report.mismatched.append(name)
    for part in parts[1:]:  # shard 0's copy is read again when written
        release_part(part, mapped)


def _write_metadata(source: Source, dst: str | os.PathLike, tp: int, bits: int, cfg: ModelConfig | None,
                    split: StageSplit | None, progress: bool) -> None:
    meta = dict(source.metadata or {})
    meta.update(format="glm-130b-release", layout_version=LAYOUT_VERSION, tp=tp, quant_bits=bits)
    meta.pop("files", None)  # the source's file records; write_latest records the new shards
    meta.pop("tensor_names", None)  # a Hugging Face clone's naming: the shards use glm-tp's names
    meta.pop("stage_layers", None)  # a source written per stage: the output has its own split, or none
    if split is not None:
        meta["stage_layers"] = split.sizes()
    if cfg is not None:
        meta["model"] = cfg.to_dict()
    if "tokenizer" in meta and (source.root / meta["tokenizer"]).is_file():  # small models carry their tokenizer
        shutil.copy(source.root / meta["tokenizer"], Path(dst) / meta["tokenizer"])
    write_latest(dst, source.iteration, meta, progress=progress)


def _stages(cfg: ModelConfig | None, tp: int, pp: int, stage_sizes: list[int] | None) -> list[Stage] | None:
    """The stages to write per-stage shards for (None: one set of shards), each as its TP rank 0 sees it."""
    if pp == 1 and not stage_sizes:
        return None
    if cfg is None:
        raise CheckpointError("writing per pipeline stage needs the model's shape (which layers exist, whether the "
                              "head is tied): pass --model")
    split = StageSplit.from_sizes(stage_sizes, cfg.num_layers, pp) if stage_sizes else \
        StageSplit.even(cfg.num_layers, pp)
    return [Stage(split, s, s * tp, RankLayout(tp, pp)) for s in range(pp)]


def _warn(report: Report) -> None:
    for name in report.mismatched:
        warnings.warn(f"replicated tensor {name} differs across source shards: kept shard 0's copy")
    if report.lossy:
        warnings.warn(f"{len(report.lossy)} quantized weights were dequantized and quantized again "
                      f"(e.g. {report.lossy[0]}): this is lossy; start from the fp16 checkpoint for exact results")


def rewrite(src: str | os.PathLike, dst: str | os.PathLike, tp: int, bits: int | None = None,
            model: ModelConfig | None = None, progress: bool = True, pp: int = 1,
            stage_sizes: list[int] | None = None) -> Report:
    """Reshard `src` (any layout open_source reads) to `tp` release-format shards, and quantize to `bits`
    (8, 4, 0 = float, None = as the source). pp > 1: `tp` shards per pipeline stage (`stage_sizes` layers
    each, default as even as they go), each holding only what that stage holds (`Stage.holds`), in
    `<iter>/stage_SS/`; the split is recorded in glm_tp.json."""
    source = open_source(src)
    cfg = model or source.model_config()
    if cfg is not None:
        cfg.check_tp(tp)
    stages = _stages(cfg, tp, pp, stage_sizes)
    src_bits = source_bits(source, cfg.hidden_size if cfg is not None else None)
    bits = src_bits if bits is None else bits
    names = [n for n in source.names() if not is_ignored(n) and not n.endswith("_scale")]
    planner = Planner(source, tp, src_bits, bits, cfg)
    # (path, tensors) of every output file, stage-major; each tensor goes to every rank of the stages holding it
    outputs = [(Path(dst) / source.iteration / shard_name(r), names) for r in range(tp)] if stages is None else \
        [(Path(dst) / source.iteration / stage_folder(st.index) / shard_name(r),
          [n for n in names if st.holds(n, cfg.tied_lm_head)]) for st in stages for r in range(tp)]
    specs: list[Specs] = [{} for _ in outputs]
    for i, (_, held) in enumerate(outputs):  # every shape first (no data read): a cut that cannot be made fails
        for name in held:                    # before any file is written
            specs[i].update(planner.slice(name, i % tp).specs)

    report = Report()
    writers = [ShardWriter(path, spec) for (path, _), spec in zip(outputs, specs)]
    wanted = [set(held) for _, held in outputs]
    for name in tqdm(names, desc=f"{source.shards} -> {len(outputs)} shards", unit="tensor", disable=not progress):
        _check_replicated(name, source.parts(name), cfg, source.mapped, report)
        for i, writer in enumerate(writers):
            if name not in wanted[i]:
                continue
            piece = planner.slice(name, i % tp)
            writer.write(piece.specs, piece.fill)
            if piece.lossy and name not in report.lossy:
                report.lossy.append(name)
    report.shard_bytes = [w.close() for w in writers]

    _write_metadata(source, dst, tp, bits, cfg, stages[0].split if stages else None, progress)
    _warn(report)
    return report
