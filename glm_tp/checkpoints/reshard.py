"""Rewrite a checkpoint for another TP size and/or precision, one parameter at a time.

Used by glm-tp-repartition and glm-tp-quantize (glm_tp/cli/convert.py). Every source shard is
memory-mapped, every output shard is written in place (`ShardWriter`), and each parameter's pages are
dropped once it is written, so host RAM holds about one parameter across all shards, never the model.

Quantized input: column-parallel weights keep their per-row scales when cut or joined (exact). A
row-parallel weight's scales cover its whole input slice: cut into pieces, each piece keeps its source's
scales (exact, as the loader does); joined from several sources, it is dequantized and quantized again,
which is lossy (a warning says so). Asking for other bits re-quantizes everything.
"""
from __future__ import annotations

import mmap
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from glm_tp.checkpoints.release import (
    LAYOUT_VERSION,
    CheckpointError,
    CheckpointInfo,
    detect_quant_bits,
    inspect,
    open_shard,
    release_pages,
    shard_name,
    write_latest,
)
from glm_tp.config import ModelConfig
from glm_tp.kernels.formats import dequantize, quantize_rows
from glm_tp.parallel.partition import (
    Layout,
    copy_plan,
    is_ignored,
    layout_of,
    merge_into,
    merged_shape,
    reshard,
    single_source,
    split_into,
)

QUANTIZED_SUFFIXES = ("attention.query_key_value.weight", "attention.dense.weight", "mlp.dense_h_to_4h.weight",
                      "mlp.dense_4h_to_h.weight")


class ShardWriter:
    """Writes one shard file tensor by tensor, in the format torch.load(mmap=True) reads.

    torch.save first lays the file out without data (skip_data), then the file is mapped shared and
    each tensor's bytes are copied in as they are produced; the file gets its real name when complete.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
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

    def write(self, name: str, tensor: torch.Tensor) -> None:
        target = self.targets[name]
        target.copy_(tensor)
        release_pages(target)  # shared mapping: the bytes stay in the file, the pages leave our RSS
        self.pending.discard(name)

    def write_merged(self, name: str, parts: list[torch.Tensor], layout: Layout,
                     release: Callable[[torch.Tensor], None]) -> None:
        target = self.targets[name]
        merge_into(target, parts, layout, done=release)
        release_pages(target)
        self.pending.discard(name)

    def write_split(self, name: str, part: torch.Tensor, layout: Layout, pieces: int, index: int) -> None:
        target = self.targets[name]
        split_into(target, part, layout, pieces, index)
        release_pages(target)
        self.pending.discard(name)

    def close(self) -> int:
        if self.pending:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(self.pending)[:3]}")
        size = sum(t.numel() * t.element_size() for t in self.targets.values())
        del self.targets
        os.replace(self.tmp, self.path)
        return size


@dataclass
class Report:
    shard_bytes: list[int] = field(default_factory=list)
    lossy: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def _is_quantized_weight(name: str) -> bool:
    return name.endswith(QUANTIZED_SUFFIXES)


def _plan_tensor(name: str, parts: list[torch.Tensor], scales: list[torch.Tensor] | None, src_bits: int,
                 bits: int, tp: int, report: Report, glu: bool = True) -> list[dict[str, torch.Tensor]]:
    """The output pieces (name -> tensor per target rank) of one source parameter. On meta tensors
    the same code yields the output shapes and dtypes without touching data."""
    layout = layout_of(name, glu)
    if layout is Layout.REPLICATED:
        if parts[0].device.type != "meta" and any(not torch.equal(parts[0], p) for p in parts[1:]):
            report.mismatched.append(name)
        return [{name: parts[0]}] * tp
    if not _is_quantized_weight(name) or (not src_bits and not bits):
        return [{name: p} for p in reshard(parts, layout, tp)]
    scale_name = name + "_scale"
    if src_bits and src_bits == bits and layout is not Layout.ROW:
        # per-row scales travel with their rows: exact
        return [{name: q, scale_name: s} for q, s in zip(reshard(parts, layout, tp), reshard(scales, layout, tp))]
    if src_bits and src_bits == bits:  # row-parallel: exact where every rank's slice lies in one source
        full = merged_shape([tuple(p.shape) for p in parts], layout)
        sources = [single_source(copy_plan(layout, full, len(parts), tp, rank)) for rank in range(tp)]
        if None not in sources:
            return [{name: q, scale_name: scales[src]} for q, src in zip(reshard(parts, layout, tp), sources)]
    if src_bits:
        if layout is Layout.ROW or src_bits != bits:
            report.lossy.append(name)
        parts = [dequantize(q, s, src_bits, torch.float16) for q, s in zip(parts, scales)]
    pieces = reshard(parts, layout, tp)
    if not bits:
        return [{name: p} for p in pieces]
    out = []
    for p in pieces:
        q, s = quantize_rows(p, bits)
        out.append({name: q, scale_name: s})
    return out


def _output_specs(names: list[str], states: list[dict], src_bits: int, bits: int, tp: int,
                  glu: bool) -> list[dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """Shape and dtype of every output tensor of every rank, from shapes alone (meta tensors)."""
    def shape_only(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")  # (Tensor.to("meta") may read the data)

    specs: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{} for _ in range(tp)]
    for name in names:
        meta = [shape_only(s[name]) for s in states]
        scales = [shape_only(s[name + "_scale"]) for s in states] if name + "_scale" in states[0] else None
        for rank, piece in enumerate(_plan_tensor(name, meta, scales, src_bits, bits, tp, Report(), glu)):
            specs[rank].update({k: (tuple(v.shape), v.dtype) for k, v in piece.items()})
    return specs


def _write_metadata(info: CheckpointInfo, src: str | os.PathLike, dst: str | os.PathLike, tp: int, bits: int,
                    cfg: ModelConfig | None, progress: bool) -> None:
    meta = dict(info.metadata or {})
    meta.update(format="glm-130b-release", layout_version=LAYOUT_VERSION, tp=tp, quant_bits=bits)
    if cfg is not None:
        meta["model"] = cfg.to_dict()
    if "tokenizer" in meta and (Path(src) / meta["tokenizer"]).is_file():  # small models carry their tokenizer
        shutil.copy(Path(src) / meta["tokenizer"], Path(dst) / meta["tokenizer"])
    write_latest(dst, info.iteration, meta, progress=progress)


def _warn(report: Report) -> None:
    for name in report.mismatched:
        warnings.warn(f"replicated tensor {name} differs across source shards: kept shard 0's copy")
    if report.lossy:
        warnings.warn(f"{len(report.lossy)} quantized weights were dequantized and quantized again "
                      f"(e.g. {report.lossy[0]}): this is lossy; start from the fp16 checkpoint for exact results")


def rewrite(src: str | os.PathLike, dst: str | os.PathLike, tp: int, bits: int | None = None,
            model: ModelConfig | None = None, progress: bool = True) -> Report:
    """Reshard `src` to `tp` ranks (and quantize to `bits`: 8, 4, 0 = float, None = as the source)."""
    info = inspect(src)
    if tp % info.tp and info.tp % tp:
        raise CheckpointError(f"cannot go from {info.tp} to {tp} shards: one count must be a multiple of the other")
    sources = [open_shard(p) for p in info.shards]
    states = [s for s, _ in sources]
    mapped = all(m for _, m in sources)
    cfg = model or info.model_config()
    src_bits = info.quant_bits if info.quant_bits is not None else \
        (detect_quant_bits(states[0], cfg) if cfg else int(any(k.endswith("_scale") for k in states[0])) * 8)
    if src_bits and cfg is None and info.metadata is None:
        raise CheckpointError(f"{src} is quantized but has no glm_tp.json: pass --model to tell INT8 from INT4")
    bits = src_bits if bits is None else bits
    glu = cfg.glu if cfg is not None else True
    names = [n for n in states[0] if not is_ignored(n) and not n.endswith("_scale")]
    missing = [n for s in states for n in names if n not in s]
    if missing:
        raise CheckpointError(f"source shards disagree: {missing[0]} is missing from one of them")

    report = Report()
    specs = _output_specs(names, states, src_bits, bits, tp, glu)
    writers = [ShardWriter(Path(dst) / info.iteration / shard_name(r), specs[r]) for r in range(tp)]
    release = release_pages if mapped else (lambda t: None)
    for name in tqdm(names, desc=f"{info.tp} -> {tp} shards", unit="tensor", disable=not progress):
        parts = [s[name] for s in states]
        scales = [s[name + "_scale"] for s in states] if name + "_scale" in states[0] else None
        layout = layout_of(name, glu)
        if info.tp != tp and layout is not Layout.REPLICATED and not scales and not bits:
            # plain resharding: copy straight between the mapped files, dropping each part when done
            if info.tp > tp:
                k = info.tp // tp
                for rank, writer in enumerate(writers):
                    writer.write_merged(name, parts[rank * k:(rank + 1) * k], layout, release)
            else:
                k = tp // info.tp
                for i, part in enumerate(parts):
                    for j in range(k):
                        writers[i * k + j].write_split(name, part, layout, k, j)
                    release(part)
            continue
        for rank, piece in enumerate(_plan_tensor(name, parts, scales, src_bits, bits, tp, report, glu)):
            for key, tensor in piece.items():
                writers[rank].write(key, tensor)
        for t in parts + (scales or []):
            release(t)
    report.shard_bytes = [w.close() for w in writers]

    _write_metadata(info, src, dst, tp, bits, cfg, progress)
    _warn(report)
    return report

