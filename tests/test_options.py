"""The run options' choices and checks (config.py), shared by load_model, the layers and the settings check."""
from __future__ import annotations

import pytest
import torch

from glm_tp.config import (
    KERNELS,
    LM_HEADS,
    check_choice,
    check_kernels,
    check_lm_head,
    default_dtype,
    parse_quant,
)


def test_one_message_for_every_choice():
    with pytest.raises(ValueError, match=r"^unknown color 'blue': use one of auto, never$"):
        check_choice("color", "blue", ("auto", "never"))
    with pytest.raises(ValueError, match=r"^unknown kernels 'fast': use one of fused, weight-only, q8, torch, dequant$"):
        check_kernels("fast")
    with pytest.raises(ValueError, match=r"^unknown lm_head 'int4': use one of model, int8$"):
        check_lm_head("int4")
    for kernels in KERNELS:
        check_kernels(kernels)
    for lm_head in LM_HEADS:
        check_lm_head(lm_head)


def test_quant_choices_and_the_default_dtype():
    assert [parse_quant(q) for q in (None, "auto", "none", "INT8", "int4", 0, 8)] == [None, None, 0, 8, 4, 0, 8]
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        parse_quant("int3")
    assert default_dtype("cuda") == default_dtype(torch.device("cuda", 1)) == torch.float16
    assert default_dtype(torch.device("cpu")) == torch.float32
