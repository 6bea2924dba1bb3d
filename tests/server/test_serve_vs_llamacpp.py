"""tools/serve_vs_llamacpp.py's prompts and table (the servers themselves are not started here)."""
from __future__ import annotations

import argparse
import sys

import pytest

from glm_tp.text.tokenizer import load_tokenizer
from tests.support import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from serve_vs_llamacpp import _parser, check, sides, table  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    base = dict(checkpoint="ckpt", llama_server="bin", gguf="m.gguf", slots=8, threads=2, max_tokens=64,
                clients=[1, 8, 32], glm_batch_32=True)
    return argparse.Namespace(**{**base, **kw})


def test_prompts_have_one_token_per_unit_and_a_prefix_of_their_own():
    glm = sides(_args())["glm-tp"]
    tok = load_tokenizer(ROOT / "glm_tp" / "demo" / "tokenizer.model")
    counts = {len(tok.encode(glm.prompt(i, 30))) for i in range(200)}
    assert counts == {31}  # the leading word boundary, then one token per digit
    assert len({glm.prompt(i, 30)[:3] for i in range(200)}) == 200
    llama = sides(_args())["llama-server"]
    assert all(len(llama.prompt(i, 28)) == 28 and llama.prompt(i, 28).isalpha() for i in range(50))


def test_commands_give_both_servers_the_same_slots_and_threads():
    servers = sides(_args())
    glm, llama = servers["glm-tp"].command(9000), servers["llama-server"].command(9000)
    assert "batch_size=8" in glm and "server.port=9000" in glm
    assert llama[llama.index("-np") + 1] == "8" and llama[llama.index("-t") + 1] == "2"
    assert "batch_size=32" in servers["glm-tp bs32"].command(9000)


def _row(tok_s: float, ms: float) -> dict:
    return {"tokens_s": tok_s, "ttft_p50": ms / 1e3, "ttft_p99": ms / 1e3, "itl_p50": ms / 1e3, "itl_p99": ms / 1e3}


def test_the_table_holds_medians_over_rounds_and_medians_of_per_round_ratios():
    rounds = [{"glm-tp": {1: _row(10, 100)}, "llama-server": {1: _row(20, 50)}},
              {"glm-tp": {1: _row(30, 100)}, "llama-server": {1: _row(30, 100)}},
              {"glm-tp": {1: _row(12, 300)}, "llama-server": {1: _row(12, 100)}}]
    row = table(rounds, [1]).splitlines()[2]
    # tok/s medians 12 and 20; per-round ratios 0.5, 1, 1: median 1.00 (not 12/20); TTFT ratios 2, 1, 3: 2.00
    assert row.startswith("| glm-tp | 1 | 12.0 | 20.0 | 1.00 | 100 / 100 ms (2.00) |")


@pytest.mark.parametrize("argv, field", [(["--rounds", "0"], "--rounds"), (["--clients", "1", "0"], "--clients"),
                                         (["--prompt-tokens", "9999"], "--prompt-tokens"), (["--port", "0"], "--port")])
def test_numbers_out_of_bounds_are_one_line_naming_the_flag(argv, field, capsys):
    ap = _parser()
    with pytest.raises(SystemExit):
        check(ap, ap.parse_args(argv))
    assert field in capsys.readouterr().err.splitlines()[-1]
