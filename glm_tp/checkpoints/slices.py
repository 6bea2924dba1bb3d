"""One rank's slice of one tensor, built from the parts of a `Source` that overlap it (`partition.copy_plan`).

Shared by the loader (slices into a model's parameters) and reshard.py (slices into the shards it
writes), so both cut, join and dequantize the same way. Each source part's mapped pages are dropped
once its last planned copy is done, so a join holds its output plus about one part.
"""
from __future__ import annotations

import torch

from glm_tp.checkpoints.release import release_pages
from glm_tp.checkpoints.sources import FusedRows, Part
from glm_tp.kernels.formats import dequantize
from glm_tp.parallel.partition import Copy, Layout, merged_shape


def full_shape(parts: list[Part], layout: Layout, cut: bool) -> tuple[int, ...]:
    """The whole tensor's shape: the parts joined, when the source is cut into shards."""
    return merged_shape([tuple(p.shape) for p in parts], layout) if cut else tuple(parts[0].shape)


def planned_shape(full: tuple[int, ...], plan: list[Copy]) -> tuple[int, ...]:
    """The shape of the slice `plan` builds from a tensor of shape `full`."""
    shape = list(full)
    if shape:
        shape[plan[0].dim] = sum(c.length for c in plan)
    return tuple(shape)


def release_part(part: Part, mapped: bool) -> None:
    if isinstance(part, FusedRows):
        for stored in part.parts:
            release_part(stored, mapped)
    elif mapped and isinstance(part, torch.Tensor):
        release_pages(part)


def _release_after_last_use(parts: list[Part], plan: list[Copy], index: int, mapped: bool) -> None:
    src = plan[index].src
    if all(c.src != src for c in plan[index + 1:]):
        release_part(parts[src], mapped)


def gather(out: torch.Tensor, parts: list[Part], plan: list[Copy], mapped: bool) -> torch.Tensor:
    """Copy the planned slices of `parts` into `out`."""
    for i, c in enumerate(plan):
        out.narrow(c.dim, c.dst_offset, c.length).copy_(parts[c.src].narrow(c.dim, c.src_offset, c.length))
        _release_after_last_use(parts, plan, i, mapped)
    return out


def gather_dequantized(out: torch.Tensor, parts: list[Part], scales: list[Part], plan: list[Copy], bits: int,
                       mapped: bool) -> torch.Tensor:
    """Like `gather`, from INT`bits` weights with per-row scales into float `out` ([rows, input values])."""
    per_byte = 8 // bits  # values per stored int8 (INT4: two, packed along the input dim)
    for i, c in enumerate(plan):
        q = parts[c.src].narrow(c.dim, c.src_offset, c.length)
        if c.dim == 0:  # a block of rows: their own scales
            scale = scales[c.src].narrow(0, c.src_offset, c.length)
            out.narrow(0, c.dst_offset, c.length).copy_(dequantize(q, scale, bits, out.dtype))
        else:  # a block of input columns: every row of the source, with that source's row scales
            scale = scales[c.src].narrow(0, 0, out.shape[0])
            out.narrow(1, c.dst_offset * per_byte, c.length * per_byte).copy_(dequantize(q, scale, bits, out.dtype))
        _release_after_last_use(parts, plan, i, mapped)
    return out
