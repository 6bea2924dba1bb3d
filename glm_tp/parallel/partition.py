"""How each checkpoint tensor is split across tensor-parallel ranks: the one home of that rule.

The layers, the loader, `tools/make_checkpoint.py` and `tools/repartition.py` all ask this module.
Layouts (weights are [out, in], as F.linear takes them):

- COLUMN: contiguous cut along dim 0. The vocab-parallel embedding and the QKV projection use it;
  QKV rows are head-major ([q k v] of head 0, then head 1, ...), so a cut by rows is a cut by heads.
- GLU: dim 0 holds [value rows ; gate rows]; rank r keeps its slice of the value rows followed by
  its slice of the gate rows, because GeGLU halves each rank's own output. A GeLU MLP (ChatGLM-6B)
  has no gate: its h->4h is plain COLUMN (`layout_of(..., glu=False)`).
- ROW: contiguous cut along dim 1 (the input dim) of attention.dense and dense_4h_to_h weights.
- REPLICATED: every rank holds the same tensor (LayerNorms, row-parallel biases).

Every rule is expressed once, by `pieces`: the ranges of the full tensor a rank's shard is made of.
`copy_plan` intersects those ranges between any two cuts (N source shards, tp ranks, no integer
ratio needed), so a rank can take its slice from any checkpoint without building the full tensor.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from glm_tp.config import ModelConfig


class Layout(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    GLU = "glu"
    ROW = "row"


# (suffix of the parameter name, layout of .weight, layout of .bias)
_LINEARS: dict[str, tuple[Layout, Layout]] = {
    "attention.query_key_value": (Layout.COLUMN, Layout.COLUMN),
    "attention.dense": (Layout.ROW, Layout.REPLICATED),
    "mlp.dense_h_to_4h": (Layout.GLU, Layout.GLU),
    "mlp.dense_4h_to_h": (Layout.ROW, Layout.REPLICATED),
}
QUANTIZED_LINEARS: tuple[str, ...] = tuple(_LINEARS)
QUANTIZED_WEIGHTS: tuple[str, ...] = tuple(f"{linear}.weight" for linear in _LINEARS)
PRECISION_PROBE = "transformer.layers.0.attention.query_key_value.weight"  # tells a checkpoint's precision
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # the reference ignores it too; tables are recomputed
_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


def short_name(name: str) -> str:
    """'transformer.layers.3.mlp.dense_h_to_4h.weight' -> 'mlp.dense_h_to_4h.weight'."""
    m = _LAYER_RE.match(name)
    return m.group(2) if m else name.removeprefix("transformer.")


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def layout_of(name: str, glu: bool = True) -> Layout:
    """glu=False: the model's MLP is a plain GeLU (ChatGLM-6B), so h->4h is cut like any column layer."""
    short = short_name(name)
    if short in ("word_embeddings.weight", "lm_head.weight"):
        return Layout.COLUMN
    for linear, (weight_layout, bias_layout) in _LINEARS.items():
        if not glu and weight_layout is Layout.GLU:
            weight_layout = bias_layout = Layout.COLUMN
        if short == f"{linear}.weight":
            return weight_layout
        if short == f"{linear}.bias":
            return bias_layout
        if short == f"{linear}.weight_scale":
            # one scale per output row: it follows the weight's rows; ROW weights' scales are per
            # rank and only re-quantizing can change their split (see quant.py)
            return Layout.REPLICATED if weight_layout is Layout.ROW else weight_layout
    return Layout.REPLICATED


def split(t: torch.Tensor, layout: Layout, tp: int) -> list[torch.Tensor]:
    """Cut a full tensor into `tp` rank shards (views where possible)."""
    if tp == 1 or layout is Layout.REPLICATED:
        return [t] * tp
    out = []
    for rank in range(tp):
        views = shard_views(t, layout, tp, rank)
        out.append(views[0] if len(views) == 1 else torch.cat(views, dim=_dim(layout, t.dim())))
    return out


class Piece(NamedTuple):
    """A contiguous range [start, start + length) of the full tensor along `dim`."""

    dim: int
    start: int
    length: int


def pieces(layout: Layout, full_shape: tuple[int, ...], tp: int, rank: int) -> list[Piece]:
    """The ranges of the full tensor that, joined in this order along their dim, make rank `rank`'s shard."""
    if layout is Layout.REPLICATED or not full_shape:
        return [Piece(0, 0, full_shape[0] if full_shape else 1)]
    dim = _dim(layout, len(full_shape))
    n = full_shape[dim]
    if layout is Layout.GLU:
        _check_divides(n, 2 * tp, layout)
        part = n // (2 * tp)
        return [Piece(0, rank * part, part), Piece(0, n // 2 + rank * part, part)]
    _check_divides(n, tp, layout)
    return [Piece(dim, rank * (n // tp), n // tp)]


@dataclass(frozen=True)
class Copy:
    """Copy `length` entries along `dim` from source shard `src` (at `src_offset`) to `dst_offset`."""

    dim: int
    src: int
    src_offset: int
    dst_offset: int
    length: int


def copy_plan(layout: Layout, full_shape: tuple[int, ...], sources: int, tp: int, rank: int) -> list[Copy]:
    """How rank `rank` of `tp` builds its shard from a checkpoint cut into `sources` shards by the same
    rule: only the overlaps, in order. A replicated tensor comes whole from source shard 0."""
    if layout is Layout.REPLICATED or not full_shape:
        return [Copy(0, 0, 0, 0, full_shape[0] if full_shape else 1)]
    held = [pieces(layout, full_shape, sources, s) for s in range(sources)]
    out, dst = [], 0
    for want in pieces(layout, full_shape, tp, rank):
        for s, have in enumerate(held):
            src_offset = 0
            for p in have:
                lo, hi = max(want.start, p.start), min(want.start + want.length, p.start + p.length)
                if lo < hi:
                    out.append(Copy(want.dim, s, src_offset + lo - p.start, dst + lo - want.start, hi - lo))
                src_offset += p.length
        dst += want.length
    return out


def single_source(plan: list[Copy]) -> int | None:
    """The source shard a rank's whole slice comes from, or None when it joins several. The rule for
    quantized row-parallel weights: a slice of one source keeps that source's row scales (exact); a slice
    joining several sources, quantized with different scales, must be quantized again (lossy)."""
    sources = {c.src for c in plan}
    return sources.pop() if len(sources) == 1 else None


def shard_views(t: torch.Tensor, layout: Layout, tp: int, rank: int) -> list[torch.Tensor]:
    """The views of `t` that, joined along the layout's dim, make rank `rank`'s shard."""
    if layout is Layout.REPLICATED:
        return [t]
    return [t.narrow(p.dim, p.start, p.length) for p in pieces(layout, tuple(t.shape), tp, rank)]


def merged_shape(shapes: list[tuple[int, ...]], layout: Layout) -> tuple[int, ...]:
    """The shape of the parts (given by their shapes) joined along the layout's split dim."""
    shape = list(shapes[0])
    if layout is not Layout.REPLICATED and shape:
        dim = _dim(layout, len(shape))
        shape[dim] = sum(s[dim] for s in shapes)
    return tuple(shape)


def _dim(layout: Layout, ndim: int) -> int:
    return ndim - 1 if layout is Layout.ROW else 0


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of an unquantized TP=1 model, in the release naming."""
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    up = 2 * f if cfg.glu else f  # GeGLU's h->4h holds value and gate rows
    shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
            p + "attention.query_key_value.weight": (3 * h, h), p + "attention.query_key_value.bias": (3 * h,),
            p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
            p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
            p + "mlp.dense_h_to_4h.weight": (up, h), p + "mlp.dense_h_to_4h.bias": (up,),
            p + "mlp.dense_4h_to_h.weight": (h, f), p + "mlp.dense_4h_to_h.bias": (h,),
        })
    shapes.update({"transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,)})
    if not cfg.tied_lm_head:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _check_divides(n: int, parts: int, layout: Layout) -> None:
    if n % parts:
        raise ValueError(f"a {layout.value}-parallel dimension of size {n} cannot be cut into {parts} equal parts")
