"""Checkpoints written per pipeline stage (glm-tp-repartition --pp): each stage's shards hold only its tensors,
its ranks open only its files and give the logits of one rank on the original checkpoint, the recorded split
is the one loaded, and the other tools (verify, repartition, source_bits) read the layout."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from glm_tp import load_model
from glm_tp.checkpoints import sources
from glm_tp.checkpoints.release import CheckpointError
from glm_tp.checkpoints.reshard import rewrite
from glm_tp.checkpoints.sources import open_source, source_bits
from glm_tp.cli import convert, verify
from glm_tp.config import PRESETS
from glm_tp.model.glm import SeqLayout
from glm_tp.parallel.dist import simulated_rank
from tests.support.checkpoints import identical, shards, write_random_checkpoint
from tests.support.ranks import run_ranks

CFG = dataclasses.replace(PRESETS["tiny"], num_layers=4)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("stages") / "src", CFG, 1, torch.float32)


def _logits(model) -> torch.Tensor | None:
    tokens = torch.tensor([[5, 9, 17, 33, 2, 7], [11, 3, 8, 21, 40, 6]])
    with torch.inference_mode():
        out = model(tokens, torch.arange(6).expand(2, 6), SeqLayout(torch.tensor([0, 0]), torch.tensor([3, 2])),
                    None, logits_at=torch.tensor([[5, 2], [4, 5]]))
    return None if out is None else out.float()


def _stage_rank(tp, ckpt):
    """Load with the checkpoint's recorded split, noting every file opened: the layers held, the files, logits."""
    opened, open_shard = [], sources.open_shard
    sources.open_shard = lambda path: (opened.append(str(path)), open_shard(path))[1]
    model = load_model(ckpt, tp=tp, progress=False)
    held = sorted({int(n.split(".")[2]) for n, _ in model.named_parameters() if n.startswith("transformer.layers.")})
    return held, opened, _logits(model)


def _alone(ckpt, **kw) -> torch.Tensor:
    return _logits(load_model(ckpt, tp=simulated_rank(1), progress=False, **kw))


@pytest.mark.parametrize("pp,tp,sizes,bits", [(2, 2, None, None), (2, 1, [1, 3], None), (2, 1, [3, 1], 8)])
def test_each_stage_opens_only_its_files_and_the_logits_are_those_of_one_rank(src, tmp_path, pp, tp, sizes, bits):
    ckpt = tmp_path / "staged"
    rewrite(src, ckpt, tp, bits=bits, pp=pp, stage_sizes=sizes, progress=False)
    split = sizes or [2, 2]
    assert json.loads((ckpt / "glm_tp.json").read_text())["stage_layers"] == split
    if bits:  # at TP 1 each stage's weights are the TP 1 checkpoint's, quantized alike
        flat = tmp_path / "flat"
        rewrite(src, flat, 1, bits=bits, progress=False)
        whole = shards(flat)[0]
        assert all(torch.equal(t, whole[n]) for s in shards(ckpt) for n, t in s.items())
        assert source_bits(open_source(ckpt, 1), CFG.hidden_size) == bits  # stage 1 has no layer 0 to probe
    out = run_ranks(pp * tp, _stage_rank, ckpt)
    bounds = [0, split[0], sum(split)]
    for rank, (held, opened, _) in enumerate(out):
        stage = rank // tp
        assert held == list(range(bounds[stage], bounds[stage + 1]))
        assert len(opened) == tp and all(f"stage_{stage:02d}" in f for f in opened), opened
    assert all(logits is None for *_, logits in out[1:])
    alone = _alone(flat if bits else src)
    assert (out[0][2] - alone).abs().max() < 1e-5
    assert (_alone(ckpt, pipeline_parallel=1) - alone).abs().max() < 1e-5  # read as one checkpoint


def test_a_stage_loads_with_the_other_stages_files_gone(src, tmp_path):
    ckpt = tmp_path / "staged"
    rewrite(src, ckpt, 2, pp=2, stage_sizes=[1, 3], progress=False)
    full = load_model(ckpt, tp=simulated_rank(4, 3), progress=False)
    shutil.rmtree(ckpt / "1" / "stage_00")  # a node keeps only its stage's folder, `latest` and glm_tp.json
    model = load_model(ckpt, tp=simulated_rank(4, 3), progress=False, verify=True)
    assert model.stage.index == 1 and model.tp.rank == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), full.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"stage_00 is missing") as e:
        load_model(ckpt, tp=simulated_rank(4, 0), progress=False)
    assert "\n" not in str(e.value)


def test_another_split_is_one_line_naming_the_setting_and_the_recorded_split(src, tmp_path):
    ckpt = tmp_path / "staged"
    rewrite(src, ckpt, 1, pp=2, stage_sizes=[1, 3], progress=False)
    for kw, named in (({"pipeline_parallel": 2, "stage_sizes": [2, 2]}, "stage_layers=[2, 2]"),
                      ({"pipeline_parallel": 4}, "pipeline_parallel=4")):
        with pytest.raises(CheckpointError) as e:
            load_model(ckpt, tp=simulated_rank(kw["pipeline_parallel"], 0), progress=False, **kw)
        message = str(e.value)
        assert "\n" not in message and message.startswith(named) and "stage_layers=[1, 3]" in message, message
    load_model(ckpt, tp=simulated_rank(2, 0), pipeline_parallel=2, stage_sizes=[1, 3], progress=False)


def test_verify_and_repartition_read_the_stage_files(src, tmp_path, capsys):
    ckpt = tmp_path / "staged"
    convert.repartition_main([str(src), str(ckpt), "--tp", "2", "--pp", "2", "--stage-layers", "3,1"])
    assert "2 shard(s) x 2 stages" in capsys.readouterr().out
    assert verify.main([str(ckpt)]) == 0
    convert.quantize_main([str(ckpt), str(tmp_path / "q"), "--bits", "8"])  # stays per stage, with its split
    assert "2 shard(s) x 2 stages" in capsys.readouterr().out
    assert json.loads((tmp_path / "q" / "glm_tp.json").read_text())["stage_layers"] == [3, 1]
    assert source_bits(open_source(tmp_path / "q", 1), CFG.hidden_size) == 8
    rewrite(ckpt, tmp_path / "back", 1, progress=False)  # a staged source, back to one shard: bit-identical
    assert identical(tmp_path / "back", src)
    assert "stage_layers" not in json.loads((tmp_path / "back" / "glm_tp.json").read_text())
    (ckpt / "1" / "stage_01" / "mp_rank_01_model_states.pt").unlink()
    capsys.readouterr()
    assert verify.main([str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage_01" in err[0] and "mp_rank_01_model_states.pt" in err[0], err
    assert verify.main([str(ckpt), "--stage", "0"]) == 0  # a node's copy: its stage's files are whole
    assert verify.main([str(src), "--stage", "0"]) == 1
    assert "not written per pipeline stage" in capsys.readouterr().err


@pytest.mark.parametrize("args,said", [(["--stage-layers", "0,4"], "--stage-layers"),
                                       (["--pp", "0"], "--pp 0"),
                                       (["--pp", "3", "--stage-layers", "1,3"], "pipeline_parallel=3")])
def test_bad_stage_arguments_are_one_line(src, tmp_path, capsys, args, said):
    with pytest.raises(SystemExit) as e:
        convert.repartition_main([str(src), str(tmp_path / "out"), "--tp", "1", *args])
    # argparse prints its line; the command's own checks exit with theirs
    said_line = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert said in said_line and "\n" not in said_line, said_line


def test_a_stage_shard_lacking_a_tensor_is_named(src, tmp_path):
    ckpt = tmp_path / "staged"
    rewrite(src, ckpt, 2, pp=2, progress=False)
    path = ckpt / "1" / "stage_01" / "mp_rank_01_model_states.pt"
    state = {k: v.clone() for k, v in shards(ckpt)[3].items()}  # not the mapped file being rewritten
    del state["transformer.layers.3.mlp.dense_4h_to_h.weight"]
    torch.save({"module": state}, path)
    meta = json.loads((ckpt / "glm_tp.json").read_text())
    del meta["files"]  # no recorded sizes: the tensors themselves are checked
    (ckpt / "glm_tp.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"stage_01/mp_rank_01_model_states.pt lacks transformer.layers.3.mlp"):
        load_model(ckpt, tp=simulated_rank(4, 2), progress=False)
