"""The JSONL batch runner in process, on the bundled demo model: duplicate ids, a rerun after a kill, a line
cut by a crash, and the output path checked before anything runs."""
from __future__ import annotations

import json

import pytest

from glm_tp.dev.demo_corpus import held_out
from glm_tp.engine.coordinator import Coordinator
from glm_tp.frontends.batch import check_output, claim_output, done_keys, run_batch
from tests.support.server import demo_engine


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
