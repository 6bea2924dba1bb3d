"""Blank layouts: tokens, positions and attention for [MASK], [sMASK], [gMASK] and several blanks,
checked against an independent construction of the reference's rules."""
from __future__ import annotations

import pytest
import torch

from glm_tp.config import SpecialTokens
from glm_tp.model.glm import SeqLayout
from glm_tp.text.blanks import (
    PromptError,
    check_length,
    complete_context,
    fill_kind,
    next_blank,
    splice,
    tokenize_prompt,
)
from glm_tp.text.stream import TextStream
from glm_tp.text.tokenizer import (
    REPLACEMENT,
    TokenizerError,
    load_tokenizer,
)

S = SpecialTokens(mask=1000, gmask=1001, smask=1002, sop=1004, eop=1005, eos=2, pad=0)


def reference_layout(context: list[int], mask_id: int, gmask: bool, gen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's construction over context+[sop]+gen tokens: a lower-triangular matrix with the
    first len(context) columns opened, and positions pinned to the mask unless [gMASK]."""
    total = len(context) + 1 + gen
    visible = torch.ones(total, total).tril()
    visible[:, :len(context)] = 1
    positions = torch.arange(total)
    if not gmask:
        positions[len(context):] = context.index(mask_id)
    return visible.bool(), positions


@pytest.mark.parametrize("kind", ["mask", "smask", "gmask"])
def test_layout_matches_reference_construction(kind):
    mask_id = getattr(S, kind)
    context = complete_context([5, 6, mask_id, 7, 8], S)
    assert context == [5, 6, mask_id, 7, 8, S.eos]  # not ending with a mask: eos appended
    assert fill_kind(context, S) == mask_id
    blank = next_blank(context, mask_id, S)
    gen = 4
    positions = blank.positions + [blank.position_after(t) for t in range(gen)]
    want_visible, want_positions = reference_layout(context, mask_id, kind == "gmask", gen)
    assert positions == want_positions.tolist()
    assert blank.tokens == context + [S.sop] and blank.bidirectional == len(context)
    total = len(blank.tokens) + gen
    layout = SeqLayout(pad=torch.tensor([0]), bidirectional=torch.tensor([blank.bidirectional]))
    assert torch.equal(~layout.mask(0, total, total, torch.device("cpu"))[0, 0], want_visible)


def test_left_padding_hides_pad_slots():
    layout = SeqLayout(pad=torch.tensor([2]), bidirectional=torch.tensor([3]))
    visible = ~layout.mask(0, 7, 7, torch.device("cpu"))[0, 0]
    assert not visible[:, :2].any()  # pad slots are never seen
    want, _ = reference_layout([1, 2, 3], 1, True, 1)
    assert torch.equal(visible[2:, 2:], want)


def test_mask_choice_and_completion_rules():
    assert fill_kind([1, S.gmask, 2, S.smask, S.mask], S) == S.mask  # [MASK] wins
    assert fill_kind([1, S.gmask, S.smask], S) == S.smask
    assert complete_context([5, 6], S) == [5, 6, S.gmask]  # no mask: [gMASK], which ends it: no eos
    assert complete_context([5, S.mask], S) == [5, S.mask]


def test_several_blanks_fill_left_to_right():
    ctx = complete_context([5, S.mask, 6, S.mask, 7], S)
    first = next_blank(ctx, S.mask, S)
    assert first.mask_index == 1 and first.next_position == 1
    ctx = splice(ctx, first.mask_index, [40, 41, 42])
    assert ctx == [5, 40, 41, 42, 6, S.mask, 7, S.eos]
    second = next_blank(ctx, S.mask, S)
    # the first answer is now context: the second mask sits three tokens later than it did
    assert second.mask_index == 5 and second.positions[-1] == 5 and second.bidirectional == len(ctx)
    assert next_blank(splice(ctx, 5, [50]), S.mask, S) is None


def test_prompt_text_and_newlines(tiny_tokenizer_file):
    tok = load_tokenizer(tiny_tokenizer_file, S)
    ids = tokenize_prompt("the quick\nbrown [MASK] over\nthe [gMASK]", tok)
    assert ids.count(S.mask) == 1 and ids.count(S.gmask) == 1 and ids[-1] == S.gmask
    assert tok.decode(ids) == "the quick\nbrown[MASK] over\nthe[gMASK]"
    # as icetk's line-break mode: <n> sits inside the text, the next word gets no word-boundary piece
    pieces = [tok.sp.id_to_piece(i - tok.offset) for i in tok.encode("quick\nbrown")]
    assert not pieces[pieces.index("<n>") + 1].startswith("\u2581")
    assert tokenize_prompt("no mask here", tok)[-1] == S.gmask


def test_too_long_and_missing_tokenizer(tmp_path):
    with pytest.raises(PromptError, match="max length 8: shorten it"):
        check_length(list(range(8)), 8)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    assert "ice_text.model" in str(err.value) and "tokenizer=" in str(err.value) and "\n" not in str(err.value)


def test_streamed_text_is_the_whole_decode_at_every_token(tmp_path):
    """TextStream decodes a few ids per token; at every token it must read as the whole list decoded."""
    import random

    import sentencepiece as spm

    lines = ["the quick brown fox jumps", "über naïve café déjà vu", "中文文本的测试 和 更多 字", "a  b   c\td"]
    (tmp_path / "corpus.txt").write_text("\n".join(lines * 40) + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "t"), vocab_size=320,
                                   model_type="unigram", byte_fallback=True, hard_vocab_limit=False,
                                   user_defined_symbols=["<n>"], minloglevel=2)
    tok = load_tokenizer(tmp_path / "t.model", S)
    rng = random.Random(0)
    words = [w for line in lines for w in line.split()] + ["中", "漢字", "節", "é", "ß", "\n", "  "]  # 漢 節 ß: bytes only
    answers = [tok.encode(" ".join(rng.choice(words) for _ in range(12))) for _ in range(30)]
    answers += [[rng.choice([S.eop, S.mask, *a]) for _ in range(25)] for a in answers[:10]]  # control ids too
    pieces = list(range(tok.text_vocab_size))
    answers += [[rng.choice(pieces) for _ in range(25)] for _ in range(20)]  # any ids, bytes cut anywhere
    byte_ids = [i for i in pieces if tok.sp.id_to_piece(i).startswith("<0x")]
    assert byte_ids and any(set(a) & set(byte_ids) for a in answers[:30])  # multi-byte characters were split
    for ids in answers:
        stream = TextStream(tok)
        for n in range(1, len(ids) + 1):
            assert stream.update(ids[:n]) == tok.decode(ids[:n]), (ids, n)
    assert REPLACEMENT in tok.decode([byte_ids[-1]])  # a lone byte of a character is not a character
