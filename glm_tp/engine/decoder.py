"""The decode path: one KV cache whose rows (slots) each hold one sequence, and single-token steps.

`Decoder` owns the engine's cache (rows x max_len, allocated once: what the memory planner budgets).
Every row is independent: its prompt starts at cache slot 0, and it has its own length, positions and
bidirectional span, so sequences join and leave the running batch at any step (continuous batching):
- `prefill` writes prompts (right-padded to one length) into rows [row, row + b) as one plain forward;
- `step` feeds one token to each of the rows [0, n) (the engine keeps its rows packed at the front with
  `copy_row`). Its inputs live in static device buffers: the tokens, and per row the cache length (the slot
  written next), the first generated position, whether positions count on ([gMASK]) or stay pinned
  ([MASK]), tokens generated so far and the bidirectional span. Positions, the slots and the attention
  mask are computed from them on the device, so a step makes no host round trip; keys and values are
  written in place, each row at its own slot.
- Key windows are rounded up to powers of two (slots past a row's length are masked), so a handful of
  shapes serves every length. On CUDA each (rows, key window) is captured once as a CUDA graph and
  replayed; on CPU the same step runs eagerly.
Positions may be 1D (one id per token) or 2D (position, block position: P = 2); a generated token's
position is first_position + counting * generated, per dimension.
"""
from __future__ import annotations

import warnings

import torch

from glm_tp.model.glm import GLMModel, KVCache
from glm_tp.model.masks import glm_mask

MIN_WINDOW = 64


def step_window(needed: int, max_len: int) -> int:
    """The key window a step attends over: a power of two >= needed (at least MIN_WINDOW), so that a few
    captured graphs serve every length; the slots beyond each row's length are masked."""
    window = MIN_WINDOW
    while window < needed:
        window *= 2
    return min(window, max_len)


class Decoder:
    def __init__(self, model: GLMModel, max_rows: int, max_len: int | None = None, graphs: bool | None = None,
                 position_dims: int = 1, prefix_blocks: int = 0, block: int = 16):
        self.model = model
        if max_len is not None and not 0 < max_len <= model.cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} must be between 1 and the model's {model.cfg.max_seq_len} positions")
        self.max_len = max_len or model.cfg.max_seq_len
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.max_rows = max_rows
        self.cache: KVCache | None = None  # allocated on first use
        long = dict(dtype=torch.long, device=model.device)
        self.tokens = torch.zeros(max_rows, 1, **long)
        self.length = torch.zeros(max_rows, **long)        # filled cache slots = the slot written next
        self.generated = torch.zeros(max_rows, **long)     # tokens generated in the row's current fill
        self.first_position = torch.zeros(max_rows, position_dims, **long)
        self.counting = torch.zeros(max_rows, position_dims, **long)  # 1: positions count on; 0: pinned
        self.bidirectional = torch.zeros(max_rows, **long)
        self.host_length = [0] * max_rows  # the same lengths on the host: key windows, copy bounds
        self._prompt_length = [0] * max_rows
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self._pool = None  # the captured graphs' shared memory pool
        self.prefix_blocks, self.block = prefix_blocks, block  # the prefix cache's pool (prefix_cache.py)
        self.blocks: KVCache | None = None  # allocated on first use

    def _cache(self) -> KVCache:
        if self.cache is None:
            self.cache = self.model.new_cache(self.max_rows, self.max_len)
        return self.cache

    def _block_pool(self) -> KVCache:
        if self.blocks is None:
            self.blocks = self.model.new_cache(self.prefix_blocks, self.block)
        return self.blocks

    def load_blocks(self, row: int, blocks: list[int]) -> None:
        """A cached prefix: the row's first len(blocks) * block slots from the pool, before its prefill."""
        self._cache().load_blocks(self._block_pool(), torch.tensor(blocks), row)

    def save_blocks(self, row: int, copies: list[tuple[int, int]]) -> None:
        """(block number in the row, pool block) pairs: the row's slots of each into the pool."""
        self._cache().save_blocks(self._block_pool(), torch.tensor([b for _, b in copies]), [i for i, _ in copies], row)

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, bidirectional: torch.Tensor,
                first_position: torch.Tensor, counting: torch.Tensor, row: int = 0,
                lengths: torch.Tensor | None = None, starts: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run b prompts [b, s] into rows [row, row + b) as one forward and set up their steps.

        Prompts shorter than s are right-padded (lengths [b]): a real token never sees the padding after it
        (its context is bidirectional only up to `bidirectional`, then causal), and the padded slots are
        beyond the row's length, so steps overwrite them before any query can see them.
        positions [b, s] or [b, s, P]; bidirectional [b]: context tokens every query sees; first_position
        and counting [b] or [b, P]: the first generated token's position and whether later ones count on.
        starts [b]: slots already holding the prompt's first tokens (a cached prefix, `load_blocks`); the
        tokens given go after them, attending to them as one prompt would.
        Returns the logits after each prompt's last token (rank 0; None elsewhere)."""
        b, s = tokens.shape
        lengths = torch.full((b,), s, dtype=torch.long) if lengths is None else lengths
        starts = torch.zeros(b, dtype=torch.long) if starts is None else starts
        window = int((starts + s).max())
        if window > self.max_len:
            raise ValueError(f"a prompt of {window} tokens exceeds the decoder's {self.max_len} slots")
        if row + b > self.max_rows:
            raise ValueError(f"rows {row}..{row + b - 1} are outside the decoder's {self.max_rows} rows")
        rows = slice(row, row + b)
        self.first_position[rows] = first_position.view(b, -1)
        self.counting[rows] = counting.view(b, -1)
        self.bidirectional[rows] = bidirectional
        self.length[rows] = starts + lengths
        self.generated[rows] = 0
        for r, n in zip(range(row, row + b), (starts + lengths).tolist()):
            self.host_length[r] = self._prompt_length[r] = n
        device = self.model.device
        cache = self._cache().select(row, b)
        slots = torch.arange(s, device=device)
        if bool(starts.any()):  # each row's own slots after its prefix, as a decode step over s tokens
            slots = starts.to(device).view(b, 1) + slots
        mask = glm_mask(slots, window, bidirectional.to(device))
        return self.model.run(tokens.to(device), _squeeze(positions.to(device)), mask, cache, slots, window,
                              logits_at=(lengths - 1).to(device))

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src: its cache slots and step state (beam fan-out, packing)."""
        n = self.host_length[src]
        self._cache().copy_rows(torch.tensor([src]), torch.tensor([dst]), n)
        for buffer in (self.length, self.generated, self.first_position, self.counting, self.bidirectional):
            buffer[dst] = buffer[src]
        self.host_length[dst], self._prompt_length[dst] = n, self._prompt_length[src]

    def reorder(self, parents: list[int]) -> None:
        """Beam search: row i continues from row parents[i] (rows with parents[i] == i stay)."""
        moved = [(p, i) for i, p in enumerate(parents) if p != i]
        if not moved:
            return
        src, dst = torch.tensor([p for p, _ in moved]), torch.tensor([i for _, i in moved])
        upto = max(self.host_length[p] for p, _ in moved)
        self._cache().copy_rows(src, dst, upto)  # gathers first: a row may be both a parent and replaced
        for p, i in moved:  # beams of one request share their prompt and step count
            self.host_length[i] = self.host_length[p]

    def restart(self, rows: int) -> None:
        """Rows [0, rows) back to the end of their prompts (their keys and values stay): lets a benchmark
        time the same steps repeatedly without a new prefill."""
        self.generated[:rows] = 0
        for r in range(rows):
            self.host_length[r] = self._prompt_length[r]
        self.length[:rows] = torch.tensor(self._prompt_length[:rows], device=self.length.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Feed one token to each of the rows [0, n), n = len(tokens); returns the logits that follow (rank 0)."""
        rows = tokens.shape[0]
        needed = max(self.host_length[:rows]) + 1
        if needed > self.max_len:
            raise ValueError(f"decoding past the cache's {self.max_len} slots")
        self.tokens[:rows].copy_(tokens.view(-1, 1))
        for r in range(rows):
            self.host_length[r] += 1
        key = (rows, step_window(needed, self.max_len))
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
        slot = self.length[:rows].view(rows, 1)
        positions = self.first_position[:rows] + self.counting[:rows] * self.generated[:rows].view(rows, 1)
        mask = glm_mask(slot, window, self.bidirectional[:rows])  # slots past a row's length stay hidden
        logits = self.model.run(self.tokens[:rows], _squeeze(positions.unsqueeze(1)), mask,
                                self._cache().select(0, rows), slot, window)
        self.length[:rows].add_(1)
        self.generated[:rows].add_(1)
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
            self._undo_counters(rows)  # the captured step increments them again on every replay
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                captured_out = self._step(rows, window)
            self._pool = graph.pool()
            self.length[:rows].add_(1)  # capturing did not run the increments
            self.generated[:rows].add_(1)
            if out is not None:
                captured_out.copy_(out)
            return graph, captured_out
        except RuntimeError as e:  # e.g. a collective that cannot be captured with this NCCL
            warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}): decoding without graphs")
            self.graphs = False
            return None

    def _undo_counters(self, rows: int) -> None:
        self.length[:rows].sub_(1)
        self.generated[:rows].sub_(1)


def _squeeze(positions: torch.Tensor) -> torch.Tensor:
    """1D positions travel as [b, s], 2D ones as [b, s, 2]."""
    return positions.squeeze(-1) if positions.dim() == 3 and positions.shape[-1] == 1 else positions
