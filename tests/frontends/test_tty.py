"""The TTY's own pieces: /set and /beam refuse bad values in one line and keep the settings, and answers are
marked when interrupted or cut by the cache (rendered, and on a real pseudo-terminal); on a causal model
prompts are continued and /chat chats in the model's chat format; /format constrains the answers that follow."""
from __future__ import annotations

import importlib.util
import io
import sys

import pytest

from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.types import GenerationConfig, Request, Result, TokenLogprob
from glm_tp.frontends.tty import handle_command, render, run_tty
from tests.support.server import causal_engine, demo_engine
from tests.support.terminal import Terminal, launch_cmd


class _FakeCoordinator:
    """What handle_command touches: the default settings and set_default."""

    def __init__(self) -> None:
        self.default = GenerationConfig()
        self.sent: list[GenerationConfig] = []

    def set_default(self, config: GenerationConfig) -> None:
        self.sent.append(config)
        self.default = config


@pytest.mark.parametrize("line, message", [
    ("/set return_all_beams maybe",
     "error: generation setting 'return_all_beams': expected true or false, got 'maybe'"),
    ("/set max_new_tokens abc", "error: generation setting 'max_new_tokens': expected an integer, got 'abc'"),
    ("/set temperature -1", "error: temperature must be in (0, 100] (use strategy=greedy for argmax)"),
    ("/set colour red", "error: unknown generation setting 'colour'"),
    ("/beam two", "error: generation setting 'num_beams': expected an integer, got 'two'"),
])
def test_tty_set_rejects_bad_values_in_one_line_and_keeps_the_settings(line, message, capsys):
    coordinator = _FakeCoordinator()
    assert handle_command(line, coordinator)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(message)
    assert coordinator.sent == [] and coordinator.default == GenerationConfig()


def test_tty_set_takes_the_rest_of_the_line_as_the_value(capsys):
    coordinator = _FakeCoordinator()
    handle_command("/set stop end of story", coordinator)
    handle_command("/set logprobs none", coordinator)
    assert coordinator.default.stop == ("end of story",) and coordinator.default.logprobs is None


@pytest.mark.parametrize("lines, stop", [
    (["/set stop end", "/set stop"], ()),
    (["/set stop end", "/set stop none"], ()),
    (['/set stop [".", "!"]'], (".", "!")),
    (['/set stop "\\n"'], ("\n",)),
    (['/set stop "none"'], ("none",)),  # a JSON string is taken as it is
])
def test_tty_set_stop_can_be_cleared_and_given_a_list(lines, stop, capsys):
    coordinator = _FakeCoordinator()
    for line in lines:
        handle_command(line, coordinator)
    assert coordinator.default.stop == stop
    assert capsys.readouterr().out.splitlines()[-1] == f"  stop={stop}"


@pytest.mark.parametrize("line, words", [
    ("/set stop [1, 2]", "expected a string or a list of strings"),
    ('/set stop ["a"', "is not a JSON string or list"),
    ('/set stop [""]', "non-empty strings"),
])
def test_tty_set_stop_refuses_what_is_no_list_of_strings_in_one_line(line, words, capsys):
    coordinator = _FakeCoordinator()
    handle_command(line, coordinator)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("error: ") and words in out[0] and coordinator.sent == []


def test_piped_tty_refuses_input_that_is_not_utf8_goes_on_and_runs_a_last_continued_line(monkeypatch, capsys):
    engine = demo_engine(max_batch=2, max_new_tokens=4)
    typed = b"caf\xe9 [MASK]\n/set stop caf\xe9\nmonths : may june [MASK] august\ncat dog \\\nowl [MASK] \\"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    run_tty(Coordinator(engine.tp, engine), color="never")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("error: the prompt: character 3 is U+DCE9, a lone surrogate")
    assert out[1].startswith("error: the command: character 13 is U+DCE9")
    assert out[2].startswith("months : may june") and out[3].startswith("  blanks: ")
    assert out[4].startswith("cat dog") and out[5].startswith("owl")  # run, not dropped at the end of the input
    assert engine.default.stop == ()


def _result(finish: str, answer: list[int], cut: bool = False) -> Result:
    return Result(id="r", text="a b", blanks=["b"], blanks_token_ids=[answer], finish_reason=finish,
                  pieces=[("a ", False), ("b", True)], cut_by_max_len=cut)


def test_render_marks_interrupted_answers_and_answers_cut_by_the_cache():
    assert "(interrupted)" in render(_result("length", [5, 6]), color=False, interrupted=True)
    assert "(interrupted)" in render(_result("interrupted", [5]), color=False)
    cut = render(_result("length", [5, 6], cut=True), color=False)  # the engine says max_len ended it
    assert "cut short" in cut and "max_len" in cut
    assert "cut short" not in render(_result("length", [5, 6]), color=False)  # max_new_tokens, as asked
    assert "cut short" not in render(_result("stop", [5]), color=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux pseudo-terminal")
def test_tty_marks_an_interrupted_beam_search_and_an_answer_cut_by_the_cache(tiny_checkpoints, tiny_tokenizer_file):
    term = Terminal(launch_cmd(tiny_checkpoints[1], tiny_tokenizer_file, 1, "max_len=20",
                         "generation.max_new_tokens=8", "generation.min_new_tokens=8"))
    try:
        term.expect(">>> ")
        # the first blank's 8 tokens leave the second one less room than 8 tokens
        term.send("one [MASK] two [MASK]\n")
        term.expect(r"one \[MASK\] two \[MASK\]")
        assert "cut short" in term.expect(">>> ")
        term.send("/set max_len 24\n")
        term.expect("unknown generation setting 'max_len'")
        term.send("/set max_new_tokens 12\n/set min_new_tokens 12\n/beam 4\n")
        term.expect("num_beams=4")
        term.send("one [gMASK]\n\x03")  # Ctrl-C right behind the prompt: the beam search stops
        term.expect(r"one \[gMASK\]")  # the echo
        shown = term.expect(">>> ")
        assert "(interrupted)" in shown and "cut short" not in shown
        term.send("\x04")
        assert term.proc.wait(timeout=60) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_render_shows_logprobs_when_asked():
    result = _result("stop", [5])
    assert "-0.250" not in render(result, color=False)
    result.logprobs = [TokenLogprob(5, " b", -0.25, [(5, " b", -0.25), (6, " c", -1.5)])]
    shown = render(result, color=False).splitlines()
    assert shown[-1] == "  ' b' -0.250   top: ' b' -0.250, ' c' -1.500"


def test_piped_tty_continues_a_causal_models_text_and_chats_in_its_format(monkeypatch, capsys, tmp_path,
                                                                          tiny_tokenizer_file):
    engine, direct = (causal_engine(tmp_path, tiny_tokenizer_file) for _ in range(2))
    chat = Coordinator(direct.tp, direct).chat_format
    typed = "one two three\n/chat be brief\nfour five\nsix\n/new\nseven\n/chat off\nseven [MASK]\n/help\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    run_tty(Coordinator(engine.tp, engine), color="never")
    out = capsys.readouterr().out.splitlines()
    plain = direct.generate([Request("p", "one two three")])[0]
    assert out[0] == plain.text and out[0].startswith("one two three")
    assert out[1] == "  answer: " + plain.blanks[0].strip()

    def reply(messages: list[dict]) -> str:
        return "".join(direct.generate([Request("c", token_ids=chat(messages))])[0].blanks).strip()
    system = {"role": "system", "content": "be brief"}
    first = reply([system, {"role": "user", "content": "four five"}])
    second = reply([system, {"role": "user", "content": "four five"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "six"}])
    again = reply([system, {"role": "user", "content": "seven"}])  # /new kept the system message only
    assert out[2:8] == ["  chatting (with that system message): /chat off ends it", first, second,
                        "  new conversation", again, "  plain prompts"]
    assert out[8].startswith("error: this model has no blank infilling")
    assert "/chat [SYSTEM]" in "\n".join(out[9:]) and "continues the text" in out[-1]


def test_chat_is_refused_in_one_line_without_a_chat_format(monkeypatch, capsys):
    engine = demo_engine(max_new_tokens=4)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/chat\n/help\n"))
    run_tty(Coordinator(engine.tp, engine), color="never")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "error: this model has no chat format: type prompts to continue or fill"
    assert "/chat" not in "\n".join(out[1:]) and "[gMASK] is appended" in out[-1]


@pytest.mark.skipif(importlib.util.find_spec("llguidance") is None, reason="the grammar extra (llguidance) is not installed")
def test_tty_format_constrains_the_answers_that_follow_and_refuses_bad_formats_in_one_line(monkeypatch, capsys):
    engine = demo_engine(max_batch=2, max_new_tokens=12)
    prompt = "months : may june [MASK] august"
    typed = ["/format regex (yes|no)", prompt, "/format bogus", '/format schema {"type": ', "/format regex [0-9",
             prompt, '/format schema {"type": "integer"}', prompt, "/format", prompt]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(typed) + "\n"))
    run_tty(Coordinator(engine.tp, engine), color="never")
    out = capsys.readouterr().out.splitlines()
    free = engine.generate([Request("free", prompt)])[0]
    assert out[0] == "  format: regex (yes|no)" and out[2] in ("  blanks: yes", "  blanks: no")
    assert out[3] == "error: /format takes json, schema {...}, regex PATTERN or text, not 'bogus'"
    assert out[4].startswith("error: /format schema: the schema is not JSON")
    assert out[5].startswith("error: response_format.regex does not compile")
    assert out[6:8] == out[1:3]  # the bad formats left the earlier one in place
    assert out[8] == '  format: schema {"type": "integer"}' and out[10].removeprefix("  blanks: ").isdigit()
    assert out[11:14] == ["  format: text", free.text, "  blanks: " + free.blanks[0].strip()]
    assert free.blanks[0].strip() not in ("yes", "no") and not free.blanks[0].strip().isdigit()
