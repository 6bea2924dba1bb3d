"""The sentencepiece tokenizer against icetk's, the GLM-130B release's own (an optional check)."""
from __future__ import annotations

import importlib.util

import pytest

from glm_tp.text.tokenizer import load_tokenizer


@pytest.mark.skipif(importlib.util.find_spec("icetk") is None, reason="icetk is not installed (optional check)")
def test_ids_equal_icetk(tiny_tokenizer_file, tmp_path):
    import shutil

    from icetk import IceTokenizer  # type: ignore[import-not-found]

    shutil.copy(tiny_tokenizer_file, tmp_path / "ice_text.model")
    ours = load_tokenizer(tmp_path)
    theirs = IceTokenizer(path=str(tmp_path))
    for text in ("the quick brown fox", "monday tuesday wednesday"):
        assert ours.encode(text) == theirs.encode(text)
