"""Per-rank memory before loading anything: weights at the chosen precision, the KV cache, workspace.

The same arithmetic answers "does it fit?" and "what would?": more ranks, INT8/INT4, a smaller batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

from glm_tp.config import ModelConfig
from glm_tp.engine.prefix_cache import BLOCK, blocks_for
from glm_tp.parallel.partition import QUANTIZED_WEIGHTS, full_shapes, layout_for, pieces
from glm_tp.parallel.pipeline import RankLayout, Stage, StageSplit

GiB = 1024 ** 3


@dataclass(frozen=True)
class Plan:
    cfg: ModelConfig
    tp: int
    dtype_bytes: int
    quant_bits: int
    batch: int
    max_len: int
    device: str = "cuda"  # which attention the prefill runs (model/attention.py): it decides the workspace
    pp: int = 1           # pipeline stages; the plan is the fullest stage's (its weights and KV cache)
    stage_sizes: tuple[int, ...] | None = None  # layers per stage; None: the split this plan balances
    prefix_tokens: int = 0  # the prefix cache's pool (engine/prefix_cache.py), in tokens

    def _tensor_bytes(self, name: str, shape: tuple[int, ...]) -> int:
        """One rank's share of a tensor, as partition.py cuts it (grouped-query QKV rows, KV groups replicated
        past their count): quantized linears hold bits/8 bytes per value plus an fp16 scale per row of the
        rank's shard, everything else the model's dtype."""
        cut = pieces(layout_for(name, self.cfg), shape, self.tp, 0)
        shard = list(shape)
        if shard:
            shard[cut[0].dim] = sum(p.length for p in cut)
        values = math.prod(shard)
        if self.quant_bits and name.endswith(QUANTIZED_WEIGHTS):
            return values * self.quant_bits // 8 + 2 * shard[0]
        return values * self.dtype_bytes

    def _layer_kv_bytes(self, tokens: int) -> int:
        """One layer's keys and values for `tokens` slots."""
        c = self.cfg
        width = c.kv_heads_per_rank(self.tp) * c.head_dim  # grouped-query models cache their KV groups only
        return 2 * tokens * width * self.dtype_bytes

    @cached_property
    def _parts(self) -> tuple[int, int, int]:
        """One rank's bytes of a layer's weights, of the embedding, and of the final norm with the LM head."""
        shapes = full_shapes(self.cfg)
        share = {n: self._tensor_bytes(n, s) for n, s in shapes.items() if not n.startswith("transformer.layers.")
                 or n.startswith("transformer.layers.0.")}
        layer = sum(b for n, b in share.items() if n.startswith("transformer.layers.0."))
        last = sum(b for n, b in share.items() if n.startswith(("transformer.final_layernorm.", "lm_head.")))
        return layer, share["transformer.word_embeddings.weight"], last

    @cached_property
    def split(self) -> StageSplit:
        """The layers of each pipeline stage: as given, or balanced so that the fullest stage (its layers'
        weights and caches, the embedding on the first, the final norm and head on the last) is smallest."""
        c = self.cfg
        if self.stage_sizes:
            return StageSplit.from_sizes(list(self.stage_sizes), c.num_layers, self.pp)
        layer, embedding, last = self._parts
        per_layer = layer + self._layer_kv_bytes(self._cached_tokens)
        return StageSplit.balanced(c.num_layers, self.pp, per_layer, embedding, last + embedding * c.tied_lm_head)

    @property
    def _cached_tokens(self) -> int:
        """Slots per layer: the KV cache's rows and the prefix cache's pool (whole blocks)."""
        return self.batch * self.max_len + blocks_for(self.prefix_tokens) * BLOCK

    def _stage_weights(self, stage: Stage) -> int:
        layer, embedding, last = self._parts
        tied = self.cfg.tied_lm_head
        return len(stage.layers) * layer + embedding * stage.holds("transformer.word_embeddings.weight", tied) \
            + last * stage.is_last

    @cached_property
    def _fullest(self) -> Stage:
        """The stage whose ranks need the most memory (weights and caches): the one the plan is for."""
        stages = [Stage(self.split, s, s * self.tp, RankLayout(self.tp, self.pp)) for s in range(self.pp)]
        return max(stages, key=lambda st: self._stage_weights(st)
                   + len(st.layers) * self._layer_kv_bytes(self._cached_tokens))

    @property
    def weight_bytes(self) -> int:
        """One rank's weights, tensor by tensor as partition.py cuts them (the fullest stage's)."""
        return self._stage_weights(self._fullest)

    @property
    def kv_bytes(self) -> int:
        return len(self._fullest.layers) * self._layer_kv_bytes(self.batch * self.max_len)

    @property
    def prefix_bytes(self) -> int:
        """The prefix cache's pool: whole blocks of keys and values, as the KV cache holds them."""
        return len(self._fullest.layers) * self._layer_kv_bytes(blocks_for(self.prefix_tokens) * BLOCK)

    @property
    def workspace_bytes(self) -> int:
        """Activations of the widest step (a full-length prefill of the batch), its attention, full-vocab
        logits of the batch on rank 0, and the runtime's own overhead (CUDA context, allocator slack: ~1 GiB).
        The attention: the bool mask of every query and key, and on CUDA the fp32 scores the reference's recipe
        holds (GLM-130B, ChatGLM-6B); torch's fused attention (CPU, and ChatGLM2/3 and GLM-4 everywhere) never
        holds them (measured: 0.2 GB over the inputs at 8k tokens
        and 8 heads, where the scores would be 2 GiB)."""
        c = self.cfg
        tokens = self.batch * self.max_len
        activations = tokens * (3 * c.hidden_size + (2 if c.glu else 1) * c.inner_hidden_size) // self.tp * self.dtype_bytes
        held = self.device == "cuda" and not c.causal  # the reference's recipe; fused attention never holds them
        scores = self.batch * (c.num_heads // self.tp) * self.max_len * self.max_len * 4 if held else 0
        mask = self.batch * self.max_len * self.max_len
        logits = self.batch * c.vocab_size * 4
        runtime = GiB if self.device == "cuda" else GiB // 2  # CPU: the interpreter and torch, about 0.4 GB
        return activations + scores + mask + logits + runtime

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.prefix_bytes + self.workspace_bytes

    def fits(self, device_bytes: float) -> bool:
        return self.total_bytes <= device_bytes

    def table(self, device_bytes: float | None = None) -> str:
        precision = f"int{self.quant_bits}" if self.quant_bits else f"{8 * self.dtype_bytes}-bit float"
        rows = [("weights", self.weight_bytes), ("KV cache", self.kv_bytes)] \
            + [("prefix", self.prefix_bytes)] * bool(self.prefix_tokens) \
            + [("workspace", self.workspace_bytes), ("total", self.total_bytes)]
        stages = f", PP={self.pp} (layers {'+'.join(map(str, self.split.sizes()))})" if self.pp > 1 else ""
        lines = [f"per-rank memory plan: {self.cfg.num_layers} layers x {self.cfg.hidden_size}, TP={self.tp}{stages}, "
                 f"{precision}, batch {self.batch} x {self.max_len} tokens"]
        lines += [f"  {name:<10} {size / GiB:9.2f} GiB" for name, size in rows]
        if device_bytes:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(f"  {'device':<10} {device_bytes / GiB:9.2f} GiB  -> {verdict} "
                         f"({(device_bytes - self.total_bytes) / GiB:+.2f} GiB headroom)")
        return "\n".join(lines)


def with_prefix_cache(plan: Plan, tokens: int | None, device_bytes: float | None) -> Plan:
    """The plan with the prefix cache the setting asks for: a size in tokens (0: off), or None: as many
    tokens as the KV cache holds for a causal model when that still fits (otherwise, and for GLM-130B and
    ChatGLM-6B, whose bidirectional contexts share little, off). With pipeline stages it is off unless asked
    for: its one block pool would keep the stages in turn (engine/lanes.py)."""
    if tokens is not None:
        return replace(plan, prefix_tokens=tokens)
    if not plan.cfg.causal or plan.pp > 1:
        return plan
    cached = replace(plan, prefix_tokens=plan.batch * plan.max_len)
    return cached if device_bytes is None or cached.fits(device_bytes) else plan


def _shorter(max_len: int) -> list[int]:
    """Shorter contexts to offer (long-context models default to 32k-128k): halves down to 2048."""
    out, n = [], max_len // 2
    while n >= 2048:
        out.append(n)
        n //= 2
    return out


def alternatives(plan: Plan, device_bytes: float, max_ranks: int = 8, limit: int = 3) -> list[str]:
    """Settings that would fit, fewest changes first: more ranks (up to max_ranks per node, then pipeline stages
    across nodes), INT8/INT4, a smaller batch, a shorter max_len, or a mix (for each (layout, quant), the largest
    batch and then the longest max_len that fit)."""
    layouts = sorted(((tp, pp) for pp in (1, 2, 4) if pp <= plan.cfg.num_layers
                      for tp in plan.cfg.valid_tp_sizes(max_ranks) if tp * pp >= plan.tp * plan.pp),
                     key=lambda layout: (layout[0] * layout[1], layout[1]))
    bits = [plan.quant_bits] + [b for b in (8, 4) if not plan.quant_bits or b < plan.quant_bits]
    batches = [plan.batch] + [b for b in (plan.batch // 2, plan.batch // 4, 1) if 1 <= b < plan.batch]
    lengths = [plan.max_len] + _shorter(plan.max_len)
    found: list[tuple[int, str]] = []
    for tp, pp in layouts:
        for q in bits:
            fit = next(((batch, n) for n in lengths for batch in dict.fromkeys(batches)
                        if (tp, pp, q, batch, n) != (plan.tp, plan.pp, plan.quant_bits, plan.batch, plan.max_len)
                        and Plan(plan.cfg, tp, plan.dtype_bytes, q, batch, n, plan.device, pp,
                                 prefix_tokens=plan.prefix_tokens).fits(device_bytes)),
                       None)
            if fit is not None:
                batch, n = fit
                ranks = [f"{tp * pp} ranks"] * (tp * pp != plan.tp * plan.pp) + [f"pipeline_parallel={pp}"] * (pp != plan.pp)
                changes = ranks + [f"quant=int{q}"] * (q != plan.quant_bits) \
                    + [f"batch_size={batch}"] * (batch != plan.batch) + [f"max_len={n}"] * (n != plan.max_len)
                found.append((len(changes) - (len(ranks) == 2), " with ".join(changes)))  # a layout is one change
    found.sort(key=lambda f: f[0])
    return [text for _, text in found[:limit]]


def refusal(plan: Plan, device_bytes: float) -> str:
    """The one line printed when a plan does not fit."""
    short = (plan.total_bytes - device_bytes) / GiB
    options = alternatives(plan, device_bytes)
    fix = f"try {' or '.join(options)}" if options else "use more or larger devices"
    has = "the device has" if plan.device == "cuda" else "this rank's share of the host's available memory is"
    return (f"the model needs {plan.total_bytes / GiB:.1f} GiB per rank but {has} "
            f"{device_bytes / GiB:.1f} GiB ({short:.1f} GiB short): {fix}")
