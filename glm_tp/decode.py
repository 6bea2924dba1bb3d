"""The decode path: one KV cache reused by every fill, and single-token steps with static inputs.

`Decoder` owns the cache of an `Engine` (rows x max_len, allocated once: the size the memory planner
budgets) and runs its forward passes:
- `prefill` writes a fill's prompt into the first rows of the cache, as a plain forward;
- `step` runs one token per row. Its inputs live in static device buffers: the tokens, the generated-token
  counter, and per row the first generated position, whether positions keep counting ([gMASK]) or stay
  pinned ([MASK]), the padding and the bidirectional span. Positions, the cache slot and the attention
  mask are computed from them on the device, so a step makes no host round trip and allocates nothing
  from Python values; keys and values are written into the cache in place.
- Key windows are rounded up to powers of two (the slots past the current one are masked), so a handful
  of shapes serves every length.
- On CUDA each (rows, key window) is captured once as a CUDA graph and replayed: a step is one launch
  instead of hundreds, which is what batch-1 decode of a large model needs to approach the bandwidth
  limit. On CPU the same step runs eagerly.
"""
from __future__ import annotations

import warnings

import torch

from .model import GLMModel, KVCache, SeqLayout

MIN_WINDOW = 64


def step_window(needed: int, max_len: int) -> int:
    """The key window a step attends over: a power of two >= needed (at least MIN_WINDOW), so that a few
    captured graphs serve every length; the slots beyond the current one are masked."""
    window = MIN_WINDOW
    while window < needed:
        window *= 2
    return min(window, max_len)


class Decoder:
    def __init__(self, model: GLMModel, max_rows: int, max_len: int | None = None, graphs: bool | None = None):
        self.model = model
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.max_rows = 0
        self.cache: KVCache | None = None  # allocated on first use, for max_rows rows
        self._grow(max_rows)
        long = dict(dtype=torch.long, device=model.device)
        self.first_slot = torch.zeros(1, **long)  # cache slot of the first generated token
        self.generated = torch.zeros(1, **long)   # tokens generated so far in this fill (on device)
        self.rows = 0
        self.width = 0      # prompt slots of the current fill
        self.steps = 0      # steps run in the current fill (host copy of `generated`)
        self._pool = None   # the captured graphs' shared memory pool

    def _grow(self, rows: int) -> None:
        """Room for `rows` rows (beam search may need more rows than the batch size)."""
        if rows <= self.max_rows:
            return
        self.max_rows, self.cache = rows, None
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        long = dict(dtype=torch.long, device=self.model.device)
        self.tokens = torch.zeros(rows, 1, **long)
        dims = (2,) if self.model.cfg.position_encoding == "2d" else ()  # 2D: (position, block position)
        self.first_position = torch.zeros(rows, *dims, **long)
        self.counting = torch.zeros(rows, *dims, **long)   # 1: positions count on; 0: pinned to the mask
        self.pad = torch.zeros(rows, **long)
        self.bidirectional = torch.zeros(rows, **long)

    def _cache(self) -> KVCache:
        if self.cache is None:
            self.cache = self.model.new_cache(self.max_rows, self.max_len)
        return self.cache

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, layout: SeqLayout,
                first_position: torch.Tensor, counting: torch.Tensor) -> torch.Tensor | None:
        """Run the prompts [rows, width] (left-padded) and set up the steps that follow.

        first_position [rows]: the position of each row's first generated token; counting [rows]: 1 where
        later positions count on, 0 where they stay pinned. Returns the logits of the last prompt token.
        """
        rows, width = tokens.shape
        if width > self.max_len:
            raise ValueError(f"a prompt of {width} tokens exceeds the decoder's {self.max_len} slots")
        self._grow(rows)
        self.rows, self.width = rows, width
        for buffer, values in ((self.first_position, first_position), (self.counting, counting),
                               (self.pad, layout.pad), (self.bidirectional, layout.bidirectional)):
            buffer[:rows].copy_(values)
        self.first_slot.fill_(width)
        self.restart()
        device = self.model.device
        return self.model(tokens.to(device), positions.to(device), layout, self._cache().rows(rows))

    def restart(self) -> None:
        """Back to the end of the prompt: the next step writes the first generated slot again (the prompt's
        keys and values stay). Lets a benchmark time the same steps repeatedly without a new prefill."""
        self.steps = 0
        self.generated.zero_()

    def reorder(self, parents: torch.Tensor) -> None:
        """Beam search: row i continues from row parents[i]."""
        self._cache().rows(self.rows).reorder(parents, upto=self.width + self.steps)

    def step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Feed one token per row [rows]; returns the logits that follow it (rank 0)."""
        needed = self.width + self.steps + 1
        if needed > self.max_len:
            raise ValueError(f"decoding past the cache's {self.max_len} slots")
        self.tokens[:self.rows].copy_(tokens.view(-1, 1))
        self.steps += 1
        key = (self.rows, step_window(needed, self.max_len))
        if not self.graphs:
            return self._step(*key)
        if key not in self._graphs:
            captured = self._capture(*key)
            if captured is None:  # capture failed: stay eager from now on
                return self._step(*key)
            self._graphs[key] = captured
            return captured[1]  # the warm-up already ran this step
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _step(self, rows: int, window: int) -> torch.Tensor | None:
        """One decode step on the static buffers; every value it needs is already on the device."""
        slot = self.first_slot + self.generated
        positions = (self.first_position[:rows] + self.counting[:rows] * self.generated).unsqueeze(1)
        keys = torch.arange(window, device=slot.device).view(1, 1, 1, window)
        pad = self.pad[:rows].view(rows, 1, 1, 1)
        visible = (keys < pad + self.bidirectional[:rows].view(rows, 1, 1, 1)) | (keys <= slot)
        mask = ~(visible & (keys >= pad))
        logits = self.model.run(self.tokens[:rows], positions, mask, self._cache().rows(rows), slot, window)
        self.generated.add_(1)
        return logits

    def _capture(self, rows: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None] | None:
        """Run this step once on a side stream (warm-up: kernels chosen, workspaces allocated), then capture
        it. The warm-up's result is this step's real result; the capture itself computes nothing."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self._step(rows, window)
            torch.cuda.current_stream().wait_stream(stream)
            self.generated.sub_(1)  # the captured step increments it again on every replay
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                captured_out = self._step(rows, window)
            self._pool = graph.pool()
            self.generated.add_(1)  # capturing did not run the increment
            if out is not None:
                captured_out.copy_(out)
            return graph, captured_out
        except RuntimeError as e:  # e.g. a collective that cannot be captured with this NCCL
            warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}): decoding without graphs")
            self.graphs = False
            return None
