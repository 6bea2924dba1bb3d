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
- `GroupedQKV` (ChatGLM2/GLM-4's grouped-query attention): dim 0 holds [all q ; all k ; all v], q by heads,
  k and v by KV group. A rank takes its heads' q rows and the k/v rows of the groups those heads use: a
  share of the groups when tp divides them, else the one group its heads sit in (replicated across the
  tp / groups ranks that share it).

Every rule is expressed once, by `pieces`: the ranges of the full tensor a rank's shard is made of.
`copy_plan` intersects those ranges between any two cuts (N source shards, tp ranks, no integer
ratio needed), so a rank can take its slice from any checkpoint without building the full tensor.
`layout_for` is the rule for a model: every caller that knows the model's config asks it.
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


@dataclass(frozen=True)
class GroupedQKV:
    """The fused QKV rows (weight, bias, row scales) of grouped-query attention: `heads` query heads and
    `groups` KV heads of `head_dim` each."""

    heads: int
    groups: int
    head_dim: int

    @property
    def rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim

    def check_tp(self, tp: int) -> None:
        if self.heads % tp or (self.groups % tp and tp % self.groups):
            raise ValueError(f"{self.heads} heads in {self.groups} KV groups cannot be cut into {tp} parts: "
                             f"tp must divide the heads, and divide or be a multiple of the groups")

    def kv_groups(self, tp: int, rank: int) -> tuple[int, int]:
        """(first group, groups held) of rank `rank`: its heads use those groups only."""
        if tp <= self.groups:
            return rank * (self.groups // tp), self.groups // tp
        return rank * self.groups // tp, 1

    def shard_rows(self, tp: int) -> list[int]:
        return [sum(p.length for p in self.pieces(tp, rank)) for rank in range(tp)]

    def pieces(self, tp: int, rank: int) -> list["Piece"]:
        self.check_tp(tp)
        d, q = self.head_dim, self.heads // tp
        first, held = self.kv_groups(tp, rank)
        k0, v0 = self.heads * d, (self.heads + self.groups) * d
        return [Piece(0, rank * q * d, q * d), Piece(0, k0 + first * d, held * d), Piece(0, v0 + first * d, held * d)]


Cut = Layout | GroupedQKV  # how one tensor is split

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
# rotary tables stored as buffers (ChatGLM-6B's, GlmForCausalLM's; ChatGLM2's rotary_pos_emb): the model computes its own
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")
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


def layout_for(name: str, cfg: ModelConfig | None) -> Cut:
    """The cut of `name` in a model of shape `cfg` (None: GLM-130B's rules)."""
    if cfg is None:
        return layout_of(name)
    if cfg.kv_groups and short_name(name).startswith("attention.query_key_value."):
        return GroupedQKV(cfg.num_heads, cfg.kv_groups, cfg.head_dim)
    return layout_of(name, cfg.glu)


def split(t: torch.Tensor, layout: Cut, tp: int) -> list[torch.Tensor]:
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


def pieces(layout: Cut, full_shape: tuple[int, ...], tp: int, rank: int) -> list[Piece]:
    """The ranges of the full tensor that, joined in this order along their dim, make rank `rank`'s shard."""
    if layout is Layout.REPLICATED or not full_shape:
        return [Piece(0, 0, full_shape[0] if full_shape else 1)]
    if isinstance(layout, GroupedQKV):
        return layout.pieces(tp, rank)
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


def copy_plan(layout: Cut, full_shape: tuple[int, ...], sources: int, tp: int, rank: int) -> list[Copy]:
    """How rank `rank` of `tp` builds its shard from a checkpoint cut into `sources` shards by the same
    rule: only the overlaps, in order, each range once (from the first source that holds it: grouped KV
    rows may sit in several). A replicated tensor comes whole from source shard 0."""
    if layout is Layout.REPLICATED or not full_shape:
        return [Copy(0, 0, 0, 0, full_shape[0] if full_shape else 1)]
    held = [pieces(layout, full_shape, sources, s) for s in range(sources)]
    out, dst = [], 0
    for want in pieces(layout, full_shape, tp, rank):
        found = []  # (lo, hi, source, offset of lo in that source's shard)
        for s, have in enumerate(held):
            src_offset = 0
            for p in have:
                lo, hi = max(want.start, p.start), min(want.start + want.length, p.start + p.length)
                if lo < hi:
                    found.append((lo, hi, s, src_offset + lo - p.start))
                src_offset += p.length
        done = want.start
        for lo, hi, s, offset in sorted(found, key=lambda f: f[0]):
            if hi > done:
                skip = max(0, done - lo)
                out.append(Copy(want.dim, s, offset + skip, dst + lo + skip - want.start, hi - lo - skip))
                done = hi
        dst += want.length
    return out


def single_source(plan: list[Copy]) -> int | None:
    """The source shard a rank's whole slice comes from, or None when it joins several. The rule for
    quantized row-parallel weights: a slice of one source keeps that source's row scales (exact); a slice
    joining several sources, quantized with different scales, must be quantized again (lossy)."""
    sources = {c.src for c in plan}
    return sources.pop() if len(sources) == 1 else None


def shard_views(t: torch.Tensor, layout: Cut, tp: int, rank: int) -> list[torch.Tensor]:
    """The views of `t` that, joined along the layout's dim, make rank `rank`'s shard."""
    if layout is Layout.REPLICATED:
        return [t]
    return [t.narrow(p.dim, p.start, p.length) for p in pieces(layout, tuple(t.shape), tp, rank)]


def merged_shape(shapes: list[tuple[int, ...]], layout: Cut) -> tuple[int, ...]:
    """The shape of the parts (given by their shapes) joined along the layout's split dim. Grouped QKV
    shards may repeat KV rows: shards of the expected sizes make its full rows (other sizes are summed, so
    the mismatch shows)."""
    shape = list(shapes[0])
    if isinstance(layout, GroupedQKV):
        whole = [s[0] for s in shapes] == layout.shard_rows(len(shapes))
        shape[0] = layout.rows if whole else sum(s[0] for s in shapes)
    elif layout is not Layout.REPLICATED and shape:
        dim = _dim(layout, len(shape))
        shape[dim] = sum(s[dim] for s in shapes)
    return tuple(shape)


def _dim(layout: Cut, ndim: int) -> int:
    return ndim - 1 if layout is Layout.ROW else 0


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of an unquantized TP=1 model, in the release naming."""
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    up = 2 * f if cfg.glu else f  # GeGLU's h->4h holds value and gate rows (SwiGLU's gate and up rows)
    qkv = GroupedQKV(cfg.num_heads, cfg.kv_groups, cfg.head_dim).rows if cfg.kv_groups else 3 * h
    norms = ("weight",) if cfg.norm == "rmsnorm" else ("weight", "bias")
    shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        linears = {"attention.query_key_value": (qkv, h), "attention.dense": (h, h),
                   "mlp.dense_h_to_4h": (up, h), "mlp.dense_4h_to_h": (h, f)}
        for linear, shape in linears.items():
            shapes[f"{p}{linear}.weight"] = shape
            if cfg.bias == "all" or linear == "attention.query_key_value":
                shapes[f"{p}{linear}.bias"] = shape[:1]
        shapes.update({f"{p}{norm}.{w}": (h,) for norm in ("input_layernorm", "post_attention_layernorm")
                       for w in norms})
    shapes.update({f"transformer.final_layernorm.{w}": (h,) for w in norms})
    if not cfg.tied_lm_head:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _check_divides(n: int, parts: int, layout: Layout) -> None:
    if n % parts:
        raise ValueError(f"a {layout.value}-parallel dimension of size {n} cannot be cut into {parts} equal parts")
