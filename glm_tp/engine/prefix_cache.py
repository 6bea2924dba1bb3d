"""Prefix caching: keys and values of earlier prompts (and of their answers) kept in blocks and copied into a
new fill's first cache slots, so that its prefill computes only the rest.

Every rank holds the same block pool (a `KVCache` of `blocks` rows of `BLOCK` slots: its own KV heads); rank
0 alone holds the `PrefixIndex`, which decides what each block holds, and the plan tells every rank which
blocks to copy in and out (plan.py: `Admission.blocks`, `StepPlan.saves`).

A block is named by its tokens, their positions and the block before it (a chain, from a root), so a
block matches only where the whole prefix up to and including it is the same. What the root is follows
from the attention:
- causal models (ChatGLM2/3, GLM-4): a token's keys and values depend on the tokens before it only, so
  every chain starts at one root, and any prompt sharing whole blocks with an earlier one (the history a
  chat client resends, a shared system prompt, n > 1 copies) reuses them;
- GLM-130B and ChatGLM-6B: the first `bidirectional` tokens (the context) all see each other, so every
  context token's keys and values depend on the whole context. The root is the whole context (its tokens
  and positions): only a fill with exactly the same context (n > 1 draws, retries, the same prompt again)
  matches, and then any of its blocks, those of the context included, is exact. A later blank of the same
  prompt has the earlier answers spliced into its context: another root, nothing shared.
A fill always computes at least its last token (its logits are the first choice). Blocks are evicted least
recently used first; a block a running fill was admitted from, or that another block continues, is never
evicted (parents are touched after their children, so the LRU order meets children first).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from glm_tp.text.blanks import Position

BLOCK = 16  # tokens per block


def blocks_for(tokens: int, block: int = BLOCK) -> int:
    """The pool's blocks for a budget in tokens (whole blocks only)."""
    return max(0, tokens) // block


def root_of(tokens: Sequence[int], positions: Sequence[Position], bidirectional: int) -> Hashable:
    """The chain root of a fill: nothing for a causal one, its whole bidirectional context otherwise."""
    if not bidirectional:
        return None
    return tuple(tokens[:bidirectional]), _hashable(positions[:bidirectional])


def _hashable(positions: Sequence[Position]) -> tuple:
    return tuple(p if isinstance(p, int) else tuple(p) for p in positions)


class PrefixIndex:
    """Rank 0's map of the pool: which prefix block lives where, pins, LRU, and the hit statistics."""

    def __init__(self, blocks: int, block: int = BLOCK):
        self.blocks, self.block = blocks, block
        self.keys: dict[Hashable, int] = {}           # block key -> block id
        self.key_of: list[Hashable | None] = [None] * blocks
        self.parent: list[int] = [-1] * blocks
        self.children = [0] * blocks                  # indexed blocks continuing this one
        self.pins = [0] * blocks                      # running fills admitted from this block
        self.lru: OrderedDict[int, None] = OrderedDict()  # indexed blocks, least recently used first
        self.free = list(range(blocks - 1, -1, -1))

    def _key(self, parent: int, root: Hashable, tokens: Sequence[int], positions: Sequence[Position]) -> Hashable:
        return (parent, root if parent < 0 else None, tuple(tokens), _hashable(positions))

    def _chain(self, tokens: Sequence[int], positions: Sequence[Position], upto: int):
        """(block number, its key's pieces) of the whole blocks of tokens[:upto]."""
        b = self.block
        for i in range(upto // b):
            yield i, tokens[i * b:(i + 1) * b], positions[i * b:(i + 1) * b]

    def match(self, root: Hashable, tokens: Sequence[int], positions: Sequence[Position]) -> list[int]:
        """The blocks holding the longest cached prefix of a fill, leaving at least its last token to compute."""
        found, parent = [], -1
        for _, toks, pos in self._chain(tokens, positions, len(tokens) - 1):
            block = self.keys.get(self._key(parent, root, toks, pos))
            if block is None:
                break
            found.append(block)
            parent = block
        return found

    def admit(self, blocks: list[int]) -> None:
        """A fill starts from these blocks: they stay until `release`."""
        for block in blocks:
            self.pins[block] += 1
        self._touch(blocks)

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.pins[block] -= 1

    def save(self, root: Hashable, tokens: Sequence[int], positions: Sequence[Position]) -> list[tuple[int, int]]:
        """Index the whole blocks of a row's valid slots (tokens, at positions); returns the (block number in
        the row, pool block) pairs whose keys and values the row must copy out (those not already held).
        Stops early when every block is pinned or continued."""
        copies, chain, parent = [], [], -1
        for i, toks, pos in self._chain(tokens, positions, len(tokens)):
            key = self._key(parent, root, toks, pos)
            block = self.keys.get(key)
            if block is None:
                block = self._allocate(chain)
                if block is None:
                    break
                self.keys[key], self.key_of[block], self.parent[block] = block, key, parent
                if parent >= 0:
                    self.children[parent] += 1
                copies.append((i, block))
            chain.append(block)
            self.lru[block] = None
            parent = block
        self._touch(chain)
        return copies

    def _allocate(self, keep: list[int]) -> int | None:
        """A free block, else the least recently used one nothing needs (not pinned, not continued, not in
        the chain being saved)."""
        if self.free:
            return self.free.pop()
        held = set(keep)
        victim = next((b for b in self.lru if not self.pins[b] and not self.children[b] and b not in held), None)
        if victim is None:
            return None
        del self.lru[victim], self.keys[self.key_of[victim]]
        if self.parent[victim] >= 0:
            self.children[self.parent[victim]] -= 1
        self.key_of[victim], self.parent[victim] = None, -1
        return victim

    def _touch(self, chain: list[int]) -> None:
        for block in reversed(chain):  # parents end up more recent than their children
            self.lru.move_to_end(block)

    @property
    def used(self) -> int:
        return len(self.lru)


def prefix_stats(prompt_tokens: int, reused_tokens: int, index: PrefixIndex | None) -> dict[str, float]:
    """The engine's prefix-cache figures: prompt tokens of admitted fills, those copied from the cache
    instead of computed, the hit rate (reused / prompt tokens) and the pool's blocks (used, all)."""
    return {"prefill_prompt_tokens": prompt_tokens, "prefix_cache_reused_tokens": reused_tokens,
            "prefix_cache_hit_rate": reused_tokens / prompt_tokens if prompt_tokens else 0.0,
            "prefix_cache_blocks_used": index.used if index else 0, "prefix_cache_blocks": index.blocks if index else 0}
