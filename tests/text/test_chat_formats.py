"""ChatGLM2's rounds, ChatGLM3's and GLM-4's role tokens: the context ids of the models' published examples."""
from __future__ import annotations

import re

import pytest
import sentencepiece as spm

from glm_tp.config import CHATGLM2_SPECIALS, CHATGLM3_ROLES
from glm_tp.text.blanks import PromptError
from glm_tp.text.chat import chat_format, chat_ids, chat_prompt
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from glm_tp.text.tokenizer import load_tokenizer

# the conversation chat-template test suites render for every model
CONVERSATION = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Who are you"},
                {"role": "assistant", "content": "   I am an assistant   "},
                {"role": "user", "content": "Another question"}]
# ... and what ChatGLM3's and GLM-4's tokenizer_config.json chat templates render for it (with the generation
# prompt), followed by the newline of a plain reply's empty metadata line, which glm-tp puts in the context
CHATGLM3_RENDERED = ("[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello<|assistant|>\n Hi there"
                     "<|user|>\n Who are you<|assistant|>\n    I am an assistant   <|user|>\n Another question<|assistant|>\n")
GLM4_RENDERED = ("[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there<|user|>\n"
                 "Who are you<|assistant|>\n   I am an assistant   <|user|>\nAnother question<|assistant|>\n")
SPECIAL = re.compile(r"(\[gMASK\]|<sop>|sop(?=<)|<\|\w+\|>)")


def _rendered_ids(rendered: str, encode, special_id) -> list[int]:
    """A rendered template read as a Hugging Face tokenizer reads it: special tokens by name, text between."""
    ids: list[int] = []
    for k, piece in enumerate(SPECIAL.split(rendered)):
        ids += [special_id(piece)] if k % 2 else (encode(piece) if piece else [])
    return ids


@pytest.fixture()
def glm3(glm2_tokenizer_file) -> ChatGLM2Tokenizer:
    pieces = spm.SentencePieceProcessor(model_file=str(glm2_tokenizer_file)).get_piece_size()
    return ChatGLM2Tokenizer(glm2_tokenizer_file, specials={n: pieces + k for k, n in
                                                            enumerate(CHATGLM2_SPECIALS + CHATGLM3_ROLES)})


def test_chatglm2_rounds(glm3):
    sp, prefix = glm3.sp, [glm3.special.gmask, glm3.special.sop]
    one = [{"role": "user", "content": "你好"}]
    assert chat_ids(one, glm3, "chatglm2") == prefix + sp.encode("[Round 1]\n\n问：你好\n\n答：")
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
             {"role": "user", "content": "今天呢"}]
    text = "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：今天呢\n\n答："
    assert chat_ids(turns, glm3, "chatglm2") == prefix + sp.encode(text)
    assert chat_prompt(turns, "chatglm2") == "[gMASK]sop" + text
    system = [{"role": "system", "content": "You are a helpful assistant"}] + one
    assert chat_ids(system, glm3, "chatglm2") == \
        prefix + sp.encode("[Round 1]\n\n问：You are a helpful assistant\n你好\n\n答：")


def test_chatglm3_roles_as_build_chat_input_and_its_template(glm3):
    sp, ids = glm3.sp, chat_ids(CONVERSATION, glm3, "chatglm3")
    role = {n: glm3.token_id(n) for n in CHATGLM3_ROLES}
    by_hand = [glm3.special.gmask, glm3.special.sop]
    for m in CONVERSATION:  # each message: its role token, encode("\n"), encode(content)
        by_hand += [role[f"<|{m['role']}|>"]] + sp.encode("\n") + sp.encode(m["content"])
    assert ids == by_hand + [role["<|assistant|>"]] + sp.encode("\n")  # a plain reply's empty metadata line
    names = {**{n: i for n, i in role.items()}, "[gMASK]": glm3.special.gmask, "sop": glm3.special.sop}
    assert ids == _rendered_ids(CHATGLM3_RENDERED, sp.encode, names.__getitem__)


def test_chatglm3_observations_and_typed_role_tokens(glm3):
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "call"},
                {"role": "tool", "content": "<|user|> sunny"}]
    ids = chat_ids(messages, glm3, "chatglm3")
    obs, user = glm3.token_id("<|observation|>"), glm3.token_id("<|user|>")
    tail = [obs] + glm3.sp.encode("\n") + glm3.sp.encode("<|user|> sunny") + [glm3.token_id("<|assistant|>")] + \
        glm3.sp.encode("\n")
    assert ids[-len(tail):] == tail and ids.count(user) == 1  # the typed <|user|> is text
    assert chat_ids([{"role": "observation", "content": "<|user|> sunny"}], glm3, "chatglm3")[-len(tail):] == tail


def test_glm4_template(glm4_files):
    from tokenizers import Tokenizer
    library = Tokenizer.from_file(str(glm4_files / "tokenizer.json"))
    for name in ("tokenizer.json", "tokenizer.model"):
        tok = load_tokenizer(glm4_files / name)
        expected = _rendered_ids(GLM4_RENDERED, lambda t: library.encode(t).ids, library.token_to_id)
        assert chat_ids(CONVERSATION, tok, "glm4") == expected
        assert chat_prompt(CONVERSATION, "glm4") == GLM4_RENDERED
        assert chat_format("glm4", tok)(CONVERSATION) == expected
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": "Hello"}]  # no content: left out
    assert chat_prompt(empty, "glm4") == "[gMASK]<sop><|user|>\nHello<|assistant|>\n"
    tool = [{"role": "user", "content": "q"}, {"role": "assistant", "metadata": "get_weather", "content": "{}"},
            {"role": "tool", "content": "sunny"}]
    assert chat_prompt(tool, "glm4") == \
        "[gMASK]<sop><|user|>\nq<|assistant|>get_weather\n{}<|observation|>\nsunny<|assistant|>\n"


def test_chat_errors(glm2_tokenizer_file, glm3):
    glm2 = ChatGLM2Tokenizer(glm2_tokenizer_file)
    with pytest.raises(PromptError, match="no <\\|user\\|> token"):
        chat_ids([{"role": "user", "content": "hi"}], glm2, "chatglm3")
    with pytest.raises(PromptError, match="must end with a user message"):
        chat_ids(CONVERSATION[:3], glm3, "chatglm3")
    with pytest.raises(PromptError, match="unknown chat role 'robot'"):
        chat_ids([{"role": "robot", "content": "hi"}], glm3, "glm4")
    with pytest.raises(PromptError, match="unknown chat role 'tool'"):  # ChatGLM2 has no observations
        chat_ids([{"role": "tool", "content": "hi"}, {"role": "user", "content": "q"}], glm3, "chatglm2")


@pytest.mark.parametrize("template", ["chatglm", "chatglm2", "chatglm3", "glm4"])
@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_an_empty_last_message_is_refused(template, content, glm3):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": content}]
    with pytest.raises(PromptError, match=r"the last message \(messages\[2\]\) is empty"):
        chat_prompt(messages, template)
