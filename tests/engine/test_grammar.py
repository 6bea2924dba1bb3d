"""Structured output in the engine (engine/grammar.py, llguidance): every id's bytes from each tokenizer, and
on random-weight models a constrained fill writes what its grammar allows (JSON under a schema, a regex, a
GLM blank's answer), greedy or sampled, while the rows beside it get their tokens as if alone."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from glm_tp.config import PRESETS
from glm_tp.engine.constraints import (
    ConstraintError,
    JsonValue,
    Literal,
    OneOf,
    Regex,
    Sequence,
)
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.text.bpe import BPETokenizer
from glm_tp.text.chatglm2_tokenizer import ChatGLM2Tokenizer
from glm_tp.text.tokenizer import GLMTokenizer
from tests.support.byte_tokenizer import write_byte_tokenizer
from tests.support import ROOT
from tests.support.engines import causal_checkpoint, engine_for

pytest.importorskip("llguidance", reason="the grammar extra (llguidance) is not installed")
jsonschema = pytest.importorskip("jsonschema")

SPECIAL = PRESETS["tiny"].special
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                         "maximum": 120}, "ok": {"type": "boolean"}}}


DEMO = ROOT / "glm_tp" / "demo"


@pytest.fixture(scope="module")
def byte_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_byte_tokenizer(tmp_path_factory.mktemp("grammar-spm"))


@pytest.fixture(scope="module")
def causal(tmp_path_factory, byte_tokenizer_file):
    ckpt = causal_checkpoint(tmp_path_factory.mktemp("grammar"))
    return engine_for(ckpt, byte_tokenizer_file, default=GenerationConfig(max_new_tokens=60), max_batch=4)


def _joined(tok, ids: list[int]) -> bytes:
    pieces = tok.token_bytes(PRESETS["tiny"].vocab_size + 40)  # padded rows too
    return b"".join(pieces[i] for i in ids)


@pytest.mark.parametrize("offset", [0, 20])
def test_glm_tokenizer_bytes_spell_its_text(byte_tokenizer_file, offset):
    tok = GLMTokenizer(byte_tokenizer_file, SPECIAL, text_offset=offset)
    text = "the lazy dog\n{\"é\": 1}"
    assert _joined(tok, tok.encode(text)).decode().lstrip(" ") == text
    pieces = tok.token_bytes(PRESETS["tiny"].vocab_size)
    assert pieces[:offset] == [None] * offset  # ids below the offset (GLM-130B's image ids) are no text
    assert all(pieces[i] is None for i in (SPECIAL.mask, SPECIAL.gmask, SPECIAL.sop, SPECIAL.eop))
    assert pieces[offset + tok.sp.piece_to_id("<0x7B>")] == b"{"  # a byte fallback piece is its byte
    assert pieces[offset + tok.sp.piece_to_id("</s>")] is None     # a control piece is no text


def test_chatglm_6b_whitespace_pieces_are_their_spaces(tmp_path):
    model = write_byte_tokenizer(tmp_path, ("<n>", "<|tab|>", "<|blank_2|>", "<|blank_3|>"))
    tok = GLMTokenizer(model, SPECIAL, text_offset=0, whitespace=True)
    text = "one  two\tthree   four\nfive"
    ids = tok.encode(text)
    assert tok.sp.piece_to_id("<|blank_3|>") in ids and tok.sp.piece_to_id("<|tab|>") in ids
    assert _joined(tok, ids).decode().lstrip(" ") == text == tok.decode(ids)


def test_chatglm2_tokenizer_bytes_spell_its_text(byte_tokenizer_file):
    tok = ChatGLM2Tokenizer(byte_tokenizer_file, SPECIAL, {"[MASK]": 1000, "[gMASK]": 1001, "[sMASK]": 1002,
                                                           "sop": 1004, "eop": 1005})
    text = "one two\nthree {\"ok\": true} ü"
    assert _joined(tok, tok.encode(text)).decode().lstrip(" ") == text
    assert tok.token_bytes(1006)[1004] is None


def test_bpe_tokenizer_bytes_are_its_pieces():
    pieces = [bytes([b]) for b in range(256)] + [b"ab", b" \xe4\xbd"]
    names = {258 + k: n for k, n in enumerate(["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|endoftext|>"])}
    tok = BPETokenizer(pieces, lambda text: list(text.encode()), names)
    assert tok.token_bytes(270) == pieces + [None] * 12


def _json_request(rid: str, strategy: str = "greedy", schema: dict | None = SCHEMA, **cfg) -> Request:
    return Request(rid, "the quick brown fox", config=GenerationConfig(max_new_tokens=60, strategy=strategy, seed=3,
                                                                        **cfg), grammar=JsonValue(schema))


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_json_under_a_schema_beside_free_rows(causal, strategy):
    free = Request("free", "one two three", config=GenerationConfig(max_new_tokens=20, strategy=strategy, seed=5))
    alone = causal.generate([free])[0]
    constrained, beside = causal.generate([_json_request("json", strategy), free])
    assert constrained.finish_reason == "stop", constrained
    jsonschema.validate(json.loads(constrained.blanks[0]), SCHEMA)
    assert beside.token_ids == alone.token_ids  # the free row is untouched


def _walk(constraint, ids: list[int]) -> bool:
    """Feeds ids to a constraint while each is allowed; whether all were."""
    for i in ids:
        if not constraint.mask()[i]:
            return False
        constraint.advance(i)
    return True


def test_any_json_object_follows_json_and_nothing_else(causal):
    factory = causal.grammars(JsonValue(None))
    pieces = causal.compiler.tokenize
    written = _walk(ok := factory(), pieces('{"a": [1, 2.5, null], "b": {"c": "d"}}'))
    assert written and ok.can_end() and ok.finished()
    assert not _walk(factory(), pieces("[1, 2]"))  # a JSON value, but not an object
    unfinished = factory()
    assert _walk(unfinished, pieces('{"a": 1')) and not unfinished.can_end()


def test_a_sequence_and_a_choice(causal):
    grammar = Sequence((Literal("answer: "), OneOf((Regex("[0-9]{2,4}"), Literal("none")))))
    result = causal.generate([Request("seq", "one two", config=GenerationConfig(max_new_tokens=20),
                                      grammar=grammar)])[0]
    assert re.fullmatch(r"answer: ([0-9]{2,4}|none)", result.blanks[0].lstrip(" ")), result


def test_a_regex_constrains_each_blank_of_a_glm_prompt(tiny_checkpoints, byte_tokenizer_file):
    engine = engine_for(tiny_checkpoints[1], byte_tokenizer_file, max_batch=2)
    prompt = "monday is [MASK] and friday is [MASK] of the week"
    request = Request("blanks", prompt, config=GenerationConfig(max_new_tokens=12), grammar=Regex("day [0-9]{1,2}"))
    result = engine.generate([request])[0]
    assert len(result.blanks) == 2 and result.finish_reason == "stop", result
    assert all(re.fullmatch(r"day [0-9]{1,2}", b.lstrip(" ")) for b in result.blanks), result.blanks


def test_a_grammar_longer_than_max_tokens_ends_with_length(causal):
    request = Request("long", "one", config=GenerationConfig(max_new_tokens=4), grammar=Regex("[a-z]{40}"))
    result = causal.generate([request])[0]
    assert result.finish_reason == "length" and re.fullmatch(r"[a-z]+", result.blanks[0]), result


def test_a_grammar_that_does_not_compile_is_refused_with_the_reason(causal):
    bad = causal.generate([Request("bad", "one", grammar=Regex("[0-9"))])[0]
    assert bad.finish_reason == "error" and "unclosed character class" in bad.error
    with pytest.raises(ConstraintError, match="Invalid type"):
        causal.grammars(JsonValue({"type": "nonsense"}))


def test_each_grammar_compiles_once_and_the_time_is_counted(causal):
    first = causal.compiler.compiled(JsonValue(SCHEMA))
    assert causal.compiler.compiled(JsonValue(json.loads(json.dumps(SCHEMA)))) is first  # an equal schema
    before = causal.sampler.grammar.steps, causal.sampler.grammar.seconds
    causal.generate([Request("free", "one two", config=GenerationConfig(max_new_tokens=3))])
    assert (causal.sampler.grammar.steps, causal.sampler.grammar.seconds) == before  # free rows cost nothing
    result = causal.generate([_json_request("timed")])[0]
    assert causal.sampler.grammar.steps - before[0] == result.completion_tokens  # the closing brace ends it
    assert causal.sampler.grammar.seconds > before[1]


def test_a_format_the_vocabulary_cannot_write_ends_its_request_with_the_reason(tmp_path_factory, tiny_tokenizer_file):
    engine = engine_for(causal_checkpoint(tmp_path_factory.mktemp("no-braces")), tiny_tokenizer_file)  # no "{"
    free = Request("free", "one two", config=GenerationConfig(max_new_tokens=4))
    alone = engine.generate([free])[0]
    cannot, beside = engine.generate([Request("json", "one two", grammar=JsonValue(None)), free])
    assert cannot.finish_reason == "error" and "no token of the model's vocabulary" in cannot.error, cannot
    assert beside.token_ids == alone.token_ids and beside.finish_reason == alone.finish_reason


def test_text_a_schema_forces_that_no_token_writes_is_named_as_such():
    """The demo's vocabulary has "y" and "n" but no "{": the library's mask skips the forced '{"answer": "' and
    offers y and n, which it then refuses; the request ends saying why, not with a token number."""
    engine = engine_for(DEMO, DEMO / "tokenizer.model", default=GenerationConfig(max_new_tokens=16))
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    result = engine.generate([Request("a", "Is the sky blue? [gMASK]", grammar=JsonValue(schema))])[0]
    assert result.finish_reason == "error" and "no token of the model's vocabulary" in result.error, result.error
