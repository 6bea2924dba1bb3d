"""Any checkpoint at any TP size: the copy plan, 8 -> 4 -> 1 -> 2 ranks without repartitioning, quantized
sources, and the host memory of a rank that builds its slices from several shards."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from glm_tp import load_model
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.config import PRESETS, ModelConfig
from glm_tp.parallel.partition import GroupedQKV, Layout, copy_plan, split
from glm_tp.text.blanks import next_blank
from tests.support.checkpoints import identical, load_rss, write_random_checkpoint
from tests.support.ranks import greedy_blank, run_ranks

PROMPTS = ([5, 6, 7, 1000, 8, 9, 2], [11, 12, 13, 14, 15, 1001])  # a [MASK] and a [gMASK] context
STEPS = 6


@pytest.mark.parametrize("layout", [Layout.COLUMN, Layout.GLU, Layout.ROW])
def test_copy_plan_builds_every_cut_from_every_other(layout):
    full = torch.arange(48 * 24, dtype=torch.float32).view(48, 24)
    for sources in (1, 2, 3, 4, 6, 8):
        parts = split(full, layout, sources)
        for tp in (1, 2, 3, 4, 6, 12):
            if layout is Layout.ROW and 24 % tp or layout is Layout.GLU and 24 % tp:
                continue
            for rank, want in enumerate(split(full, layout, tp)):
                out = torch.empty_like(want)
                for c in copy_plan(layout, tuple(full.shape), sources, tp, rank):
                    out.narrow(c.dim, c.dst_offset, c.length).copy_(parts[c.src].narrow(c.dim, c.src_offset, c.length))
                assert torch.equal(out, want), (layout, sources, tp, rank)


def test_grouped_qkv_cut_builds_every_cut_from_every_other():
    cut = GroupedQKV(heads=8, groups=2, head_dim=3)
    full = torch.arange(cut.rows * 5, dtype=torch.float32).view(cut.rows, 5)
    for sources in (1, 2, 4, 8):
        parts = split(full, cut, sources)
        for tp in (1, 2, 4, 8):
            for rank, want in enumerate(split(full, cut, tp)):
                _, k, _ = want.split([8 // tp * 3, max(1, 2 // tp) * 3, max(1, 2 // tp) * 3])
                group = rank * 2 // tp  # the first KV group this rank's heads use
                assert torch.equal(k[:3], full[24 + 3 * group:27 + 3 * group]), (tp, rank)
                out = torch.empty_like(want)
                plan = copy_plan(cut, tuple(full.shape), sources, tp, rank)
                assert sum(c.length for c in plan) == want.shape[0]  # replicated KV rows are copied once
                for c in plan:
                    out.narrow(0, c.dst_offset, c.length).copy_(parts[c.src].narrow(0, c.src_offset, c.length))
                assert torch.equal(out, want), (sources, tp, rank)


def test_tp_sizes_follow_the_kv_groups():
    cfg = PRESETS["tiny-chatglm2"]  # 8 heads, 2 KV groups
    assert cfg.valid_tp_sizes(16) == [1, 2, 4, 8]
    assert [cfg.kv_heads_per_rank(tp) for tp in (1, 2, 4, 8)] == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="KV groups"):
        cfg.check_tp(3)


def test_grouped_kv_checkpoints_repartition_and_load_at_any_tp(tmp_path):
    """TP 4 on 2 KV groups repeats each group's rows in two shards: repartitioning and loading agree, and an
    INT8 checkpoint cut so loads close to the float model."""
    cfg = PRESETS["tiny-chatglm2"]
    one = write_random_checkpoint(tmp_path / "tp1", cfg, 1, torch.float32)
    four = write_random_checkpoint(tmp_path / "tp4", cfg, 4, torch.float32)
    rewrite(four, tmp_path / "re1", 1, progress=False)
    rewrite(one, tmp_path / "re4", 4, progress=False)
    assert identical(tmp_path / "re1", one) and identical(tmp_path / "re4", four)
    want = run_ranks(1, _greedy, one)[0]
    for (answer, logits, _), (got_answer, got_logits, _) in zip(want, run_ranks(2, _greedy, four)[0]):
        assert got_answer == answer and torch.allclose(got_logits, logits, atol=1e-5)
    rewrite(one, tmp_path / "int8", 4, bits=8, progress=False)  # the row scales follow the grouped rows
    for tp in (4, 2):
        for (_, logits, _), (_, got_logits, _) in zip(want, run_ranks(tp, _greedy, tmp_path / "int8")[0]):
            assert (got_logits - logits).abs().max() < 0.15 * logits.std()


def _greedy(tp, ckpt, kernels="fused"):
    """Greedy answers to PROMPTS (rank 0 picks, every rank follows), and the first step's logits."""
    model = load_model(ckpt, tp=tp, dtype="fp32", kernels=kernels, progress=False)
    special = model.cfg.special
    out = []
    with torch.inference_mode():
        for ids in PROMPTS:
            blank = next_blank(ids, special.mask if special.mask in ids else special.gmask, special)
            answer, seen, _ = greedy_blank(model, blank, STEPS)
            out.append((answer, seen[0] if seen else None, len(blank.tokens)))
    return out if model.tp.is_first else None


def test_eight_shards_load_on_four_one_and_two_ranks_as_repartitioned_checkpoints(tmp_path):
    cfg = PRESETS["tiny"]
    eight = write_random_checkpoint(tmp_path / "tp8", cfg, 8, torch.float32)
    repartitioned, current = {}, eight
    for tp in (4, 1, 2):  # 8 -> 4 -> 1 -> 2 with tools/repartition's rewrite
        rewrite(current, tmp_path / f"re{tp}", tp, progress=False)
        repartitioned[tp] = current = tmp_path / f"re{tp}"
    for tp in (4, 1, 2):
        direct = run_ranks(tp, _greedy, eight)[0]
        via = run_ranks(tp, _greedy, repartitioned[tp])[0]
        for (a, la, _), (b, lb, _) in zip(direct, via):
            print(f"TP={tp}: from 8 shards {a}, repartitioned {b}")
            assert a == b and torch.equal(la, lb)


def test_quantized_sources_at_other_tp_sizes(tmp_path):
    src = write_random_checkpoint(tmp_path / "fp", PRESETS["tiny"], 1, torch.float16)
    for bits in (8, 4):
        one = tmp_path / f"q{bits}-1"
        rewrite(src, one, 1, bits=bits, progress=False)
        # one shard split over two ranks: every slice keeps its source's row scales, so the weights are exact
        # (the fp32 dequantize path, so that only the sums' order differs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            at1, at2 = run_ranks(1, _greedy, one, "dequant")[0], run_ranks(2, _greedy, one, "dequant")[0]
        for (a, la, _), (b, lb, _) in zip(at1, at2):
            assert a == b and (la - lb).abs().max() < 1e-4
        # two shards joined on one rank: row-parallel weights had per-shard scales, requantized with a warning
        two = tmp_path / f"q{bits}-2"
        rewrite(src, two, 2, bits=bits, progress=False)
        with pytest.warns(UserWarning, match="dequantized and quantized again"):
            model = load_model(two, progress=False)
        assert model.quant_bits == bits
        reference = load_model(src, quant=f"int{bits}", progress=False)  # quantized straight from fp16 at TP=1
        for name, p in reference.named_parameters():
            if "query_key_value.weight" in name:  # column-parallel: the same rows, scales travel exactly
                assert torch.equal(dict(model.named_parameters())[name], p), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_rank_holds_its_share_plus_about_one_tensor(tmp_path):
    # ~200 MB of fp16 weights in 4 shards; a rank of 1 joins all four, a rank of 8 takes half of one shard
    cfg = ModelConfig(num_layers=6, hidden_size=1024, num_heads=8, inner_hidden_size=2560, vocab_size=4096,
                      max_seq_len=256)
    ckpt = write_random_checkpoint(tmp_path / "big", cfg, 4, torch.float16)
    largest = cfg.vocab_size * cfg.hidden_size * 2
    for size, rank in ((1, 0), (2, 1), (8, 5)):
        r = load_rss(ckpt, "fp16", rank_of=(rank, size))
        grown = r["peak"] - r["before"]
        print(f"4 shards -> rank {rank} of {size}: kept {r['kept'] / 1e6:.0f} MB, RSS grew {grown / 1e6:.0f} MB "
              f"({grown / r['kept']:.2f}x kept; largest tensor {largest / 1e6:.0f} MB)")
        assert grown < 1.1 * r["kept"] + largest


def _params(tp, ckpt, model):
    return {n: p.clone() for n, p in load_model(ckpt, tp=tp, model=model, progress=False).named_parameters()}


def test_a_single_unsharded_file_loads_on_two_ranks(tiny_checkpoints, tmp_path):
    from glm_tp.checkpoints.synthetic import random_shard
    torch.save(random_shard(PRESETS["tiny"], 1, 0, 0, torch.float32), tmp_path / "model.pt")  # the full tensors
    got = run_ranks(2, _params, tmp_path / "model.pt", "tiny")
    want = run_ranks(2, _params, tiny_checkpoints[2], None)
    assert all(torch.equal(g[n], w[n]) for g, w in zip(got, want) for n in w)
