"""Checkpoints that prove they are whole: recorded sizes and SHA-256, checked on load and by tools/verify.py;
every corrupt-file case is one line naming the file, before any rank computes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm_tp import CheckpointError, load_model
from glm_tp.checkpoints.release import METADATA_FILE
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.config import PRESETS
from tests.support import ROOT
from tests.support.checkpoints import write_random_checkpoint
from tests.support.ranks import run_ranks

SHARD = "1/mp_rank_01_model_states.pt"


@pytest.fixture()
def ckpt(tiny_checkpoints, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoints[2], tmp_path / "ck"))


def _load(ckpt: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, progress=False, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_writers_record_size_and_sha256(ckpt):
    files = json.loads((ckpt / METADATA_FILE).read_text())["files"]
    assert sorted(files) == ["1/mp_rank_00_model_states.pt", SHARD]
    assert all(len(r["sha256"]) == 64 and r["size"] == (ckpt / n).stat().st_size for n, r in files.items())
    load_model(ckpt, verify=True, progress=False)  # whole: loads, hashes checked


def test_truncated_missing_and_grown_files_are_named_on_every_load(ckpt):
    shard = ckpt / SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    assert f"{shard} is {len(data) - 100} bytes but glm_tp.json records {len(data)}: it is truncated" in _load(ckpt)
    shard.write_bytes(data + b"x")
    assert "altered (longer than recorded)" in _load(ckpt)
    shard.unlink()
    assert f"{shard} is missing (glm_tp.json records it)" in _load(ckpt)


def _load_on_ranks(tp, ckpt):
    try:
        load_model(ckpt, tp=tp, verify=True, progress=False)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def test_an_altered_byte_is_found_by_verify_on_every_rank(ckpt):
    shard = ckpt / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    load_model(ckpt, progress=False)  # sizes match: a plain load does not read every byte
    assert f"{shard} does not match its recorded SHA-256" in _load(ckpt, verify=True)
    # two ranks hash half the files each and both stop with the same line (rank 0 hashed the good file)
    lines = run_ranks(2, _load_on_ranks, ckpt)
    assert lines[0] == lines[1] and str(shard) in lines[0] and "SHA-256" in lines[0]


def test_verify_needs_recorded_checksums(tmp_path):
    bare = write_random_checkpoint(tmp_path / "bare", PRESETS["tiny"], 1, torch.float32, metadata=False)
    msg = _load(bare, model="tiny", verify=True)
    assert "records no checksums" in msg and "--record" in msg


def test_a_float_int4_mixup_is_named(tmp_path):
    fp = write_random_checkpoint(tmp_path / "fp", PRESETS["tiny"], 1, torch.float16)
    rewrite(fp, tmp_path / "q4", 1, bits=4, progress=False)
    mixed = Path(shutil.copytree(fp, tmp_path / "mixed"))
    shutil.copy(tmp_path / "q4" / "1" / "mp_rank_00_model_states.pt", mixed / "1")  # INT4 file, fp16 metadata
    meta = json.loads((mixed / METADATA_FILE).read_text())
    meta.pop("files")
    (mixed / METADATA_FILE).write_text(json.dumps(meta))
    msg = _load(mixed)
    assert "holds INT4 weights but the checkpoint's metadata says fp16 (not quantized)" in msg
    assert "mp_rank_00_model_states.pt" in msg


def _verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/verify.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_verify_tool(ckpt, tmp_path):
    good = _verify(str(ckpt))
    assert good.returncode == 0 and "SHA-256 match" in good.stdout
    shard = ckpt / SHARD
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = _verify(str(ckpt))
    assert bad.returncode == 1 and str(shard) in bad.stderr and "SHA-256" in bad.stderr
    # a checkpoint without checksums: every tensor read; --record writes them; then they are checked
    bare = write_random_checkpoint(tmp_path / "bare", PRESETS["tiny"], 2, torch.float32, metadata=False)
    plain = _verify(str(bare))
    assert plain.returncode == 0 and "no recorded checksums" in plain.stdout
    cut = bare / "1" / "mp_rank_00_model_states.pt"
    cut.write_bytes(cut.read_bytes()[:-4096])
    broken = _verify(str(bare))
    assert broken.returncode == 1 and str(cut) in broken.stderr
    shutil.copy(ckpt / "1" / "mp_rank_00_model_states.pt", cut)
    assert _verify(str(bare), "--record").returncode == 0
    assert "SHA-256 match" in _verify(str(bare)).stdout
