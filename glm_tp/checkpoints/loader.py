"""Fill one rank's model from any `Source`, at any TP size that divides the model.

Each parameter is built from the slices of the source tensors that overlap this rank's shard
(`partition.copy_plan`): an 8-shard release checkpoint loads on 1, 2, 4 or 16 ranks with no
repartition step and no merged tensor ever built. On CPU a slice that is one contiguous piece of a
mapped file in the model's dtype becomes the parameter itself (no copy); otherwise it is copied and
the source pages are dropped at once, so a rank holds its own share plus about one tensor.

Quantized sources: column-parallel weights and their row scales are cut exactly. A row-parallel weight
is cut along its input dim; when this rank's slice lies within one source shard it keeps that shard's
row scales (exact); when it joins pieces of several source shards, which were quantized with
different scales, it is dequantized and quantized again, with a warning (lossy).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from glm_tp.checkpoints.release import CheckpointError, shape_message
from glm_tp.checkpoints.slices import full_shape, gather, gather_dequantized
from glm_tp.checkpoints.sources import Part, Source
from glm_tp.parallel.partition import (
    Copy,
    Cut,
    Layout,
    copy_plan,
    is_ignored,
    layout_for,
    merged_shape,
    short_name,
    single_source,
)


@dataclass
class LoadReport:
    loaded: int = 0
    unexpected: list[str] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)


class RankLoader:
    """Loads this rank's parameters of `model` from `source`."""

    def __init__(self, model: torch.nn.Module, source: Source, bits: int):
        """bits: what the source holds (source_bits): 0 for float weights, 8 or 4."""
        self.model, self.source, self.bits = model, source, bits
        self.cfg, self.tp, self.rank = model.cfg, model.tp.size, model.tp.rank
        self.modules = dict(model.named_modules())
        self.report = LoadReport()

    def check(self, params: dict[str, torch.nn.Parameter]) -> None:
        model_bits = self.model.quant_bits
        if self.bits and self.bits != model_bits:
            wanted = f"INT{model_bits}" if model_bits else "a float model"
            raise CheckpointError(f"{self.source.root} holds INT{self.bits} weights but {wanted} was asked: set "
                                  f"quant=int{self.bits}, or load the fp16 checkpoint to quantize it yourself")
        missing = [n for n in params if not self.source.has(n)]
        if missing:
            raise CheckpointError(f"{self.source.root} lacks {len(missing)} tensor(s), e.g. {missing[0]}: "
                                  f"{_missing_hint(missing)}")
        stage, tied = self.model.stage, self.cfg.tied_lm_head  # another stage's tensors are not unexpected
        self.report.unexpected = [n for n in self.source.names() if n not in params and not is_ignored(n)
                                  and not n.endswith("_scale") and (stage is None or stage.holds(n, tied))]

    def load(self, progress: bool = True) -> LoadReport:
        params = {n: p for n, p in self.model.named_parameters() if not n.endswith(".weight_scale")}
        self.check(params)
        for name in tqdm(params, desc=f"loading rank {self.rank}", disable=not progress, unit="tensor", leave=False):
            owner = self.modules[name.rsplit(".", 1)[0]]
            if name.endswith(".weight") and getattr(owner, "bits", 0):
                self._load_quantized(name, owner)
            else:
                self._load_plain(name, params[name])
            self.report.loaded += 1
        if self.report.requantized and self.model.world.is_first:
            warnings.warn(f"{len(self.report.requantized)} row-parallel quantized weights join pieces of several "
                          f"source shards and were dequantized and quantized again (e.g. {self.report.requantized[0]}): "
                          f"lossy; load the fp16 checkpoint for exact results")
        return self.report

    def _plan(self, name: str, parts: list[Part], expected_full: tuple[int, ...]) -> tuple[Cut, list[Copy]]:
        layout = layout_for(name, self.cfg)
        found = full_shape(parts, layout, self.source.cut)
        if found != expected_full:
            raise CheckpointError(shape_message(name, expected_full, found))
        return layout, copy_plan(layout, found, len(parts) if self.source.cut else 1, self.tp, self.rank)

    def _expected_full(self, name: str, shard: tuple[int, ...]) -> tuple[int, ...]:
        return merged_shape([shard] * self.tp, layout_for(name, self.cfg))

    def _load_plain(self, name: str, param: torch.nn.Parameter) -> None:
        parts = self.source.parts(name)
        layout, plan = self._plan(name, parts, self._expected_full(name, tuple(param.shape)))
        if len(plan) == 1 and self.model.device.type == "cpu" and isinstance(parts[plan[0].src], torch.Tensor):
            c = plan[0]
            view = parts[c.src].narrow(c.dim, c.src_offset, c.length)
            # CPU, same dtype, one contiguous piece: no copy. It uses the mapped file's pages, or a whole tensor
            # read into memory (a slice of one would keep all of it alive).
            whole = view.numel() == parts[c.src].numel()
            if view.dtype == param.dtype and view.is_contiguous() and view.shape == param.shape and \
                    (self.source.mapped or whole):
                param.data = view
                return
        gather(param.data, parts, plan, self.source.mapped)

    def _load_quantized(self, name: str, owner: torch.nn.Module) -> None:
        parts = self.source.parts(name)
        if not self.bits:  # a float source: take this rank's float slice, the layer quantizes it
            shard = (owner.out_features, owner.in_features)
            _, plan = self._plan(name, parts, self._expected_full(name, shard))
            owner.load_float_weight_(gather(torch.empty(shard, dtype=parts[0].dtype), parts, plan, self.source.mapped))
            return
        layout, plan = self._plan(name, parts, self._expected_full(name, tuple(owner.weight.shape)))
        if not self.source.has(name + "_scale"):
            raise CheckpointError(f"{self.source.file_of(name)} holds an INT{self.bits} {name} without its "
                                  f"{name}_scale: the checkpoint is incomplete (re-copy or re-create it)")
        scales = self.source.parts(name + "_scale")
        if layout is not Layout.ROW:  # scales follow the rows: exact
            gather(owner.weight.data, parts, plan, self.source.mapped)
            scale_plan = copy_plan(layout, full_shape(scales, layout, self.source.cut), len(scales), self.tp, self.rank)
            gather(owner.weight_scale.data, scales, scale_plan, self.source.mapped)
        elif (src := single_source(plan)) is not None:  # keeps that source's row scales: exact
            gather(owner.weight.data, parts, plan, self.source.mapped)
            owner.weight_scale.data.copy_(scales[src].narrow(0, 0, owner.out_features))
        else:
            self._requantize(name, owner, parts, scales, plan)
        owner.prepared = None

    def _requantize(self, name: str, owner: torch.nn.Module, parts: list[Part], scales: list[Part],
                    plan: list[Copy]) -> None:
        values = torch.empty(owner.out_features, owner.in_features, dtype=torch.float16)
        owner.load_float_weight_(gather_dequantized(values, parts, scales, plan, self.bits, self.source.mapped))
        self.report.requantized.append(name)


def _missing_hint(missing: list[str]) -> str:
    if any(n == "lm_head.weight" for n in missing):
        return "the model has an untied lm_head but the checkpoint has none; check the model preset"
    kinds = {short_name(n) for n in missing}
    return (f"the checkpoint does not match this model shape ({len(kinds)} distinct tensor kinds missing); "
            f"check the model preset or --layers")
