"""ChatGLM3 and GLM-4 clones as users have them (config.json, weights, their own tokenizer files), written by
glm-tp-make-checkpoint and run by glm-tp-generate with nothing but checkpoint=: the command finds the model,
its tokenizer kind, its special tokens and its chat format in the clone. A completion continues its prompt, a
chat line's context is the model's chat format (checked against the `tokenizers` library's reading of the
GLM-4 clone's own tokenizer.json), and a [MASK] prompt is a clear error on these causal models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glm_tp.cli.make_checkpoint import main as make_checkpoint
from tests.support import ROOT

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好, hello"}]


def _run(clone: Path, tmp_path: Path) -> dict[str, dict]:
    job, out = tmp_path / "job.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}},
             {"custom_id": "text", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "hello there", "max_tokens": 4, "temperature": 0, "echo": True}},
             {"custom_id": "blank", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "hello [MASK] there", "max_tokens": 4}}]
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run([sys.executable, "-m", "glm_tp.generate", f"checkpoint={clone}", f"input={job}",
                           f"output={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["custom_id"]: r["response"] for r in map(json.loads, out.read_text().splitlines())}


def _check_common(records: dict[str, dict]) -> dict:
    text = records["text"]["body"]["choices"][0]
    assert records["text"]["status_code"] == 200 and text["text"].startswith("hello there")
    blank = records["blank"]
    assert blank["status_code"] == 400 and blank["body"]["error"]["code"] == "invalid_prompt"
    assert "no blank infilling" in blank["body"]["error"]["message"]
    chat = records["chat"]
    assert chat["status_code"] == 200 and chat["body"]["choices"][0]["message"]["role"] == "assistant"
    return chat["body"]


def test_a_glm4_clone_chats_in_its_format(tmp_path):
    clone = tmp_path / "glm-4-9b-chat-hf"
    make_checkpoint([str(clone), "--preset", "tiny-chatglm2", "--layout", "glm-hf"])
    chat = _check_common(_run(clone, tmp_path))
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install 'glm-tp[glm4]')")
    library = tokenizers.Tokenizer.from_file(str(clone / "tokenizer.json"))
    special = library.token_to_id
    context = [special("[gMASK]"), special("<sop>"), special("<|system|>")] + library.encode("\nbe brief").ids + \
        [special("<|user|>")] + library.encode("\n你好, hello").ids + [special("<|assistant|>")] + \
        library.encode("\n").ids
    assert chat["usage"]["prompt_tokens"] == len(context)


def test_a_chatglm3_int4_clone_loads_quantized_and_chats(tmp_path):
    clone = tmp_path / "chatglm3-6b-int4"
    make_checkpoint([str(clone), "--preset", "tiny-chatglm2", "--layout", "chatglm2", "--quant", "int4",
                     "--chat", "chatglm3"])
    assert json.loads((clone / "config.json").read_text())["quantization_bit"] == 4
    chat = _check_common(_run(clone, tmp_path))
    # [gMASK] sop, <|system|> "\n" "be brief", <|user|> "\n" "你好, hello", <|assistant|> "\n": ChatGLM3's context
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(clone / "tokenizer.model"))
    expected = 2 + 3 + 2 * len(sp.encode("\n")) + len(sp.encode("be brief")) + len(sp.encode("你好, hello")) + \
        len(sp.encode("\n"))
    assert chat["usage"]["prompt_tokens"] == expected
