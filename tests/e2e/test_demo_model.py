"""The bundled demo model answers held-out prompts, the same way at every TP size and precision."""
from __future__ import annotations

from pathlib import Path

import pytest

from glm_tp.checkpoints.reshard import rewrite
from glm_tp.dev.demo_corpus import held_out
from glm_tp.engine.types import GenerationConfig, Request
from tests.support import ROOT
from tests.support.engines import engine_for
from tests.support.ranks import run_ranks

DEMO = ROOT / "glm_tp" / "demo"
MASK_KINDS = ("recall", "cycle")


def _cases(kinds, per_kind):
    return [e for kind in kinds for e in held_out(kind, per_kind)]


def _answers(tp, ckpt: Path, kinds, per_kind: int, quant: str | None = None):
    engine = engine_for(ckpt, DEMO / "tokenizer.model", tp=tp, quant=quant, default=GenerationConfig(max_new_tokens=16),
                        max_batch=64)
    cases = _cases(kinds, per_kind)
    return [r.blanks for r in engine.generate([Request(str(i), e.prompt) for i, e in enumerate(cases)])]


def _accuracy(answers, kinds, per_kind) -> float:
    cases = _cases(kinds, per_kind)
    return sum(a == e.answers for a, e in zip(answers, cases)) / len(cases)


@pytest.fixture(scope="module")
def demo_at_tp(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {1: DEMO, **{tp: (rewrite(DEMO, root / f"tp{tp}", tp, progress=False), root / f"tp{tp}")[1] for tp in (2, 4)}}


def test_mask_blanks_are_filled_correctly_and_identically_at_tp_1_2_4(demo_at_tp):
    per_kind = 30  # 60 held-out [MASK] prompts
    tp1 = _answers(None, DEMO, MASK_KINDS, per_kind)
    accuracy = _accuracy(tp1, MASK_KINDS, per_kind)
    print(f"held-out [MASK] accuracy: {accuracy:.1%}")
    assert accuracy >= 0.9
    for tp in (2, 4):
        assert run_ranks(tp, _answers, demo_at_tp[tp], MASK_KINDS, per_kind)[0] == tp1


def test_gmask_continues_and_two_blanks_are_both_filled():
    repeat = _answers(None, DEMO, ("repeat",), 30)
    two = _answers(None, DEMO, ("two",), 30)
    print(f"[gMASK] repeat: {_accuracy(repeat, ('repeat',), 30):.1%}, two blanks: {_accuracy(two, ('two',), 30):.1%}")
    assert _accuracy(repeat, ("repeat",), 30) >= 0.9
    assert all(len(b) == 2 and all(b) for b in two)  # both blanks of every prompt get an answer
    assert _accuracy(two, ("two",), 30) >= 0.9


def test_int8_answers_as_well_as_fp32_and_int4_nearly(demo_at_tp):
    per_kind = 30
    fp32 = _accuracy(_answers(None, DEMO, MASK_KINDS, per_kind), MASK_KINDS, per_kind)
    int8 = _accuracy(_answers(None, DEMO, MASK_KINDS, per_kind, "int8"), MASK_KINDS, per_kind)
    int4 = _accuracy(_answers(None, DEMO, MASK_KINDS, per_kind, "int4"), MASK_KINDS, per_kind)
    print(f"held-out [MASK] accuracy: fp32 {fp32:.1%}, int8 {int8:.1%}, int4 {int4:.1%}")
    assert int8 >= fp32 - 0.02
    assert int4 >= fp32 - 0.10
