"""Small tokenizer files of the ChatGLM2/3 and GLM-4 kinds, built here (no downloads)."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest

from glm_tp.config import GLM4_SPECIALS

CHAT_CORPUS = ["hello world, hello there", "你好，世界！今天天气很好。", "The quick brown fox jumps over lazy dogs.",
               "Round 问 答 你好 今天呢", "You are a helpful assistant", "Who are you", "Another question",
               "我们今天去公园散步吧", "emoji 😀 and 🎉 party", "  indented\n\nnew lines\r\n"]


@pytest.fixture(scope="session")
def glm2_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentencepiece model set up as ChatGLM2's: byte fallback (newlines and rare characters are byte pieces),
    text kept as it is (no normalization, spaces kept), a dummy prefix."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("glm2-spm")
    (root / "corpus.txt").write_text("\n".join(CHAT_CORPUS * 30) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   hard_vocab_limit=False, minloglevel=2)
    return root / "tokenizer.model"


@pytest.fixture(scope="session")
def glm4_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a small byte-level BPE in both of GLM-4's files: tokenizer.json (trained here with the
    tokenizers library and GLM-4's pre-tokenizer split, its special tokens added after the vocabulary, as
    glm-4-9b-chat-hf's are) and tokenizer.model (the same ranks as tiktoken's base64 lines)."""
    pytest.importorskip("tokenizers", reason="the glm4 extra (tokenizers) is not installed")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_tp.text.bpe import GLM4_PATTERN, byte_alphabet

    root = tmp_path_factory.mktemp("glm4-bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GLM4_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CHAT_CORPUS * 30, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(list(GLM4_SPECIALS))
    tok.save(str(root / "tokenizer.json"))
    alphabet = byte_alphabet()
    vocab = sorted((i, t) for t, i in tok.get_vocab(with_added_tokens=False).items())
    lines = [base64.b64encode(bytes(alphabet[c] for c in t)).decode() + f" {i}\n" for i, t in vocab]
    (root / "tokenizer.model").write_text("".join(lines), encoding="ascii")
    return root
