"""The JSONL batch runner in process, on the bundled demo model: duplicate ids, a rerun after a kill, a line
cut by a crash, and the output path checked before anything runs; a causal model's job."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from glm_tp.dev.demo_corpus import held_out
from glm_tp.engine.coordinator import Coordinator
from glm_tp.engine.types import GenerationConfig, Request
from glm_tp.frontends.batch import run_batch
from glm_tp.frontends.results_file import check_output, claim_output, done_keys
from tests.support import ROOT
from tests.support.server import causal_engine, demo_engine


def test_batch_answers_duplicate_ids_and_a_rerun_after_a_kill_loses_neither(tmp_path, capsys):
    engine = demo_engine(max_batch=4)
    coordinator = Coordinator(engine.tp, engine)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "dup" if i % 3 == 0 else f"p{i}", "prompt": e.prompt}
             for i, e in enumerate(held_out("recall", 6) + held_out("repeat", 6))]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_batch(coordinator, src, out)
    assert "appears more than once" in capsys.readouterr().err
    full = out.read_text().splitlines()
    assert sorted(json.loads(t)["line"] for t in full) == list(range(1, 13))
    out.write_text("\n".join(full[:5]) + "\n" + full[5][:10])  # killed while writing line 6
    run_batch(coordinator, src, out)
    again = [json.loads(t) for t in out.read_text().splitlines()]
    assert sorted(r["line"] for r in again) == list(range(1, 13))  # every line once, duplicates included


def test_the_output_path_is_checked_before_anything_runs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("my notes\n")
    with pytest.raises(ValueError, match="not a glm-tp results file"):
        check_output(src, unrelated)
    assert unrelated.read_text() == "my notes\n"
    with pytest.raises(ValueError, match="not a writable folder"):
        check_output(src, tmp_path / "missing" / "out.jsonl")
    assert check_output(src, None) == tmp_path / "in.results.jsonl"


def test_a_line_cut_by_a_crash_is_dropped_before_resuming(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = "".join(json.dumps({"id": f"p-{i}", "text": "x" * 300}) + "\n" for i in range(500))
    out.write_text(whole + '{"id": "p-500", "te')
    assert done_keys(out) == {f"p-{i}": 1 for i in range(500)} and out.read_text() == whole
    assert done_keys(out) == {f"p-{i}": 1 for i in range(500)} and out.read_text() == whole  # complete: untouched


def test_one_results_file_has_one_writer(tmp_path):
    out = tmp_path / "out.jsonl"
    first = claim_output(out)
    with pytest.raises(ValueError, match="being written by another run"):
        claim_output(out)
    first.close()  # the run ended: the next one may write
    claim_output(out).close()


def _run(tmp_path, raw: bytes, output: str = "out.jsonl", **defaults) -> tuple[dict, list[dict]]:
    """The job on `raw` input bytes with the demo model: its stats and its records by line."""
    engine = demo_engine(max_batch=4, **defaults)
    src, out = tmp_path / "in.jsonl", tmp_path / output
    src.write_bytes(raw)
    stats = run_batch(Coordinator(engine.tp, engine), src, out)
    return stats, sorted((json.loads(t) for t in out.read_text(encoding="utf-8").splitlines()), key=lambda r: r.get("line", 0))


def test_a_line_that_is_not_utf8_or_holds_a_lone_surrogate_gets_a_record_and_the_job_goes_on(tmp_path):
    good = held_out("cycle", 3)
    raw = b"".join([
        json.dumps({"id": "a", "prompt": good[0].prompt}).encode() + b"\n",
        b'{"id": "b", "prompt": "caf\xe9 [MASK]"}\n',                        # latin-1, not UTF-8
        json.dumps({"id": "c", "prompt": good[1].prompt}).encode() + b"\n",
        b'{"id": "s", "prompt": "x \\ud800 [MASK]"}\n',                       # a lone surrogate in the prompt
        b'{"id": "\\udfff", "prompt": "y [MASK]"}\n',                          # ... and in an id
        b'{"custom": {"\\ud800": 1}, "id": "k", "prompt": "z [MASK]"}\n',     # ... in a key
        json.dumps({"id": "d", "prompt": good[2].prompt}).encode() + b"\n",
    ])
    stats, records = _run(tmp_path, raw)
    assert [r["id"] for r in records] == ["a", "line-2", "c", "s", "line-5", "k", "d"]
    assert records[1]["error"].startswith("line 2: not valid UTF-8 (byte 0xe9 at byte 27 of the line)")
    assert records[3]["error"].startswith("line 4: prompt: character 2 is U+D800, a lone surrogate")
    assert records[4]["error"].startswith("line 5: id: character 0 is U+DFFF")
    assert records[5]["error"].startswith("line 6: a key in custom: character 0 is U+D800")
    assert all(records[i]["error"] is None and records[i]["blanks"] for i in (0, 2, 6))
    assert (stats["done"], stats["failed"]) == (3, 4)
    again, _ = _run(tmp_path, raw)  # the rerun reads past the bad lines and has nothing left to do
    assert (again["done"], again["failed"], again["skipped"]) == (0, 0, 7)


def test_empty_prompts_and_refusals_get_line_records_and_ids_come_back_as_given(tmp_path, capsys):
    lines = [{"id": 17, "prompt": ""}, {"id": "w", "prompt": " \n "}, {"id": "t", "prompt_token_ids": []},
             {"id": 3, "prompt": "x " * 600 + "[MASK]"}, {"prompt": held_out("cycle", 1)[0].prompt},
             {"id": [1], "prompt": "x [MASK]"}, {"id": True, "prompt": "x [MASK]"}]
    raw = "\n".join(json.dumps(line) for line in lines[:3]) + "\n\n  \n" + \
        "\n".join(json.dumps(line) for line in lines[3:]) + "\n"
    stats, records = _run(tmp_path, raw.encode())
    assert [r["id"] for r in records] == [17, "w", "t", 3, "line-7", "line-8", "line-9"]
    assert [r["line"] for r in records] == [1, 2, 3, 6, 7, 8, 9]  # lines 4 and 5 are blank: no record
    for r in records[:3]:
        assert r["error"].startswith(f"line {r['line']}: ") and "empty" in r["error"]
        assert r["finish_reason"] == "error" and r["completion_tokens"] == 0 and r["text"] == ""
    assert records[3]["error"].startswith("line 6: prompt is ") and "max length" in records[3]["error"]
    assert records[4]["error"] is None and records[4]["blanks"]
    assert records[5]["error"] == "line 8: 'id' must be a string or an integer, not a list"
    assert records[6]["error"] == "line 9: 'id' must be a string or an integer, not a boolean"
    assert stats["blank"] == 2 and "2 blank line(s) (no record)" in capsys.readouterr().out
    again, _ = _run(tmp_path, raw.encode())
    assert again["skipped"] == 7 and again["done"] == again["failed"] == 0  # int ids resume too


def test_a_plain_line_in_an_openai_file_is_refused_with_its_own_id(tmp_path):
    request = {"custom_id": "oa", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": held_out("cycle", 1)[0].prompt, "max_tokens": 4}}
    raw = json.dumps(request) + "\n" + json.dumps({"id": "p1", "prompt": "x [MASK]"}) + "\n" + \
        json.dumps({"prompt": "y [MASK]"}) + "\n"
    _, records = _run(tmp_path, raw.encode())
    by_id = {r["custom_id"]: r for r in records}
    assert set(by_id) == {"oa", "p1", "line-3"}
    error = by_id["p1"]["response"]["body"]["error"]
    assert by_id["p1"]["response"]["status_code"] == 400 and error["param"] == "custom_id"
    assert error["message"].startswith("line 2: custom_id must be") and "plain" in error["message"]
    assert by_id["oa"]["response"]["status_code"] == 200


def test_a_byte_order_mark_is_ignored(tmp_path):
    raw = b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": held_out("cycle", 1)[0].prompt}).encode() + b"\n"
    _, records = _run(tmp_path, raw)
    assert records[0]["error"] is None and records[0]["blanks"]


def _write_lines(path, records: list[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("output, words", [
    ("in.jsonl", "is the input file"),
    ("unrelated.jsonl", "is not a glm-tp results file"),
    ("other.results.jsonl", "holds results of another input"),
    ("other-openai.results.jsonl", "holds results of another input"),
    ("folder", "is a folder"),
    ("new-folder/", "names a folder"),
    ("/dev/null", "not a regular file (a device or a pipe)"),
    ("/dev/full", "not a regular file (a device or a pipe)"),
    ("/proc/self/status", "system file"),
    ("/proc/glm-tp-results.jsonl", "system file"),
])
def test_an_output_that_is_no_results_file_of_this_input_is_refused(tmp_path, output, words):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [{"id": "a", "prompt": "x [MASK]"}, {"id": "b", "prompt": "y [MASK]"}])
    _write_lines(tmp_path / "unrelated.jsonl", [{"id": 1, "name": "not a result"}])
    _write_lines(tmp_path / "other.results.jsonl", [{"id": "zz", "line": 1, "text": "t", "error": None}])
    _write_lines(tmp_path / "other-openai.results.jsonl",
                 [{"id": "batch_req_1", "custom_id": "zz", "response": {}, "error": None}])
    (tmp_path / "folder").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    if output.startswith("/") and not os.path.exists(os.path.dirname(output)):
        pytest.skip(f"no {os.path.dirname(output)} here")
    target = output if output.startswith("/") else f"{tmp_path}/{output}"  # as typed: a trailing / stays
    with pytest.raises(ValueError, match=re.escape(words)):
        check_output(src, target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / "new-folder").exists()


def test_results_of_this_input_are_resumed(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [{"id": "a", "prompt": "x [MASK]"}, {"id": 2, "prompt": "y [MASK]"}, "not an object"])
    for name, records in [("plain", [{"id": 2, "line": 2, "text": "t", "error": None}]),
                          ("bad-line", [{"id": "line-3", "line": 3, "error": "line 3: ..."}]),
                          ("empty", [])]:
        _write_lines(tmp_path / name, records)
        assert check_output(src, tmp_path / name) == tmp_path / name
    (tmp_path / "cut").write_text('{"id": "a", "line": 1, "te')  # the first record, cut by a crash
    assert check_output(src, tmp_path / "cut") == tmp_path / "cut"
    openai_src = tmp_path / "oa.jsonl"
    _write_lines(openai_src, [{"custom_id": "q", "method": "POST", "url": "/v1/completions", "body": {}}])
    _write_lines(tmp_path / "oa-out", [{"id": "batch_req_x", "custom_id": "q", "response": {}, "error": None}])
    assert check_output(openai_src, tmp_path / "oa-out") == tmp_path / "oa-out"


def test_a_corrupt_line_in_the_results_names_the_file_and_the_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "line": 1, "error": null}\nnot json\n{"id": "b", "line": 2, "error": null}\n')
    with pytest.raises(ValueError, match=f"{out} line 2 is not a results record"):
        done_keys(out)
    out.write_bytes(b'{"id": "a", "line": 1, "error": null}\n["a list"]\n')
    with pytest.raises(ValueError, match="line 2 is not a results record"):
        done_keys(out)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_ends_the_job_with_one_line(tmp_path):
    engine = demo_engine(max_batch=4)
    src = tmp_path / "in.jsonl"
    _write_lines(src, [{"id": f"p{i}", "prompt": e.prompt} for i, e in enumerate(held_out("cycle", 20))])
    full = open("/dev/full", "a", encoding="utf-8")  # every flush fails with ENOSPC, as on a full disk
    with pytest.raises(ValueError, match="cannot write results to .*out.jsonl: No space left on device"):
        run_batch(Coordinator(engine.tp, engine), src, tmp_path / "out.jsonl", claimed=full)
    assert full.closed


@pytest.mark.parametrize("output", ["{tmp}/new-folder/", "/dev/null"])
def test_the_command_refuses_a_bad_output_in_one_line_with_exit_code_2(tmp_path, output):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [{"id": "a", "prompt": "x [MASK]"}])
    output = output.format(tmp=tmp_path)
    done = subprocess.run([sys.executable, "-m", "glm_tp.generate", f"input={src}", f"output={output}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: output")
    assert not (tmp_path / "new-folder").exists()


def test_logprobs_asked_for_in_a_plain_line_are_in_its_record(tmp_path):
    raw = (json.dumps({"id": "a", "prompt": "list : kite yak . again :", "generation": {"logprobs": 2}}) + "\n" +
           json.dumps({"id": "b", "prompt": "list : kite yak . again :"}) + "\n").encode()
    _, (asked, plain) = _run(tmp_path, raw)
    tokens = asked["logprobs"]
    assert len(tokens) == asked["completion_tokens"] and "".join(t["token"] for t in tokens) == asked["blanks"][0]
    assert all(len(t["top"]) == 2 and t["logprob"] <= 0 for t in tokens)
    assert "logprobs" not in plain


def test_a_batch_job_on_a_causal_model_continues_prompts_runs_ids_verbatim_and_chats(tmp_path, tiny_tokenizer_file):
    engine, direct = (causal_engine(tmp_path, tiny_tokenizer_file, max_batch=2) for _ in range(2))
    chat = Coordinator(direct.tp, direct).chat_format
    messages = [{"role": "user", "content": "one two"}]
    plain = [{"id": "a", "prompt": "the quick brown"}, {"id": "b", "prompt_token_ids": [5, 6, 7]},
             {"id": "c", "prompt": "one [MASK] three"}, {"id": "d", "prompt": "monday tuesday"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in plain))
    run_batch(Coordinator(engine.tp, engine), src, out)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for line in (plain[0], plain[1], plain[3]):
        want = direct.generate([Request("x", line.get("prompt"), token_ids=line.get("prompt_token_ids"))])[0]
        got = records[line["id"]]
        assert (got["text"], got["blanks"], got["token_ids"]) == (want.text, want.blanks, want.token_ids)
        assert got["error"] is None and got["completion_tokens"] > 0
    assert records["b"]["token_ids"][:3] == [5, 6, 7] and records["a"]["token_ids"][:2] == [1001, 1004]
    assert records["c"]["error"].startswith("line 3: ") and "no blank infilling" in records["c"]["error"]
    openai = tmp_path / "chat.jsonl"
    openai.write_text(json.dumps({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"messages": messages, "max_tokens": 8}}) + "\n")
    run_batch(Coordinator(engine.tp, engine), openai, tmp_path / "chat.out.jsonl")
    answer = json.loads((tmp_path / "chat.out.jsonl").read_text())["response"]["body"]["choices"][0]
    want = direct.generate([Request("q", token_ids=chat(messages), config=GenerationConfig(max_new_tokens=8))])[0]
    assert answer["message"]["content"] == want.blanks[0] != ""
