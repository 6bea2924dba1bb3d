"""Bad settings are one line naming the key and what it may be, before anything loads: the run's keys, the
CUDA device, the model's maximum length, the rank count."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from glm_tp.cli.generate import model_config
from glm_tp.cli.settings import (
    CONFIG_DIR,
    DEMO,
    UsageError,
    check_config,
    check_max_len,
    check_overrides,
    resolve_path,
)
from glm_tp.config import PRESETS
from glm_tp.engine.types import GenerationConfig
from tests.support import ROOT


def _config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("generate", overrides=list(overrides))


@pytest.mark.parametrize("override, named", [
    ("batch_size=0", "batch_size=0"), ("batch_size=-3", "batch_size"), ("batch_size=abc", "batch_size"),
    ("max_len=0", "max_len=0"), ("max_len=1.5", "max_len"), ("timeout_s=0", "timeout_s=0"),
    ("batch_size=inf", "batch_size=inf"),
    ("timeout_s=-1", "timeout_s"), ("device=tpu", "device='tpu': use one of auto, cpu, cuda"),
    ("color=blue", "color='blue': use one of auto, always, never"), ("kernels=x", "kernels"),
    ("quant=int3", "quant"), ("dtype=fp8", "dtype"), ("lm_head=int4", "lm_head='int4': use one of model, int8"),
    ("generation.temperature=abc", "generation.temperature: expected a number, got 'abc'"),
    ("generation.max_new_tokens=x", "generation.max_new_tokens: expected an integer"),
    ("generation.top_p=2", "top_p must be in (0, 1]"),
    ("generation.return_all_beams=maybe", "generation.return_all_beams: expected true or false"),
    ("pipeline_parallel=0", "pipeline_parallel=0"), ("pipeline_parallel=nan", "pipeline_parallel=nan"),
    ("pipeline_parallel=1e30", "between 1 and 1024"), ("stage_layers=[-1,5]", "stage_layers=[-1, 5]"),
    ("stage_layers=[1e30,2]", "stage_layers"), ("stage_layers=abc", "stage_layers='abc'"),
    ("prefix_cache_tokens=-5", "prefix_cache_tokens=-5"), ("prefix_cache_tokens=nan", "prefix_cache_tokens=nan"),
    ("prefix_cache_tokens=1e300", "between 0 and 4294967296"),
    ("pipeline_lanes=0", "pipeline_lanes=0"), ("pipeline_lanes=nan", "pipeline_lanes=nan"),
    ("pipeline_lanes=2", "at most pipeline_parallel=1"),
])
def test_each_bad_setting_is_one_line_naming_its_key(override, named):
    with pytest.raises(UsageError) as err:
        check_config(_config(override))
    message = str(err.value)
    assert named in message and "\n" not in message


def test_good_settings_pass_and_give_the_generation_defaults():
    gen = check_config(_config("generation.temperature=0.5", "generation.stop=[a,b]", "max_len=64"))
    assert gen.temperature == 0.5 and gen.stop == ("a", "b")


def test_max_len_over_the_models_maximum_is_refused_not_capped():
    demo = model_config(_config())
    check_max_len(demo.max_seq_len, demo, GenerationConfig())
    with pytest.raises(UsageError, match=f"max_len={demo.max_seq_len + 1} is over the model's maximum of "
                                         f"{demo.max_seq_len} tokens"):
        check_max_len(demo.max_seq_len + 1, demo, GenerationConfig())


def test_a_default_max_new_tokens_no_prompt_fits_beside_is_refused_at_start():
    demo = model_config(_config())
    check_max_len(64, demo, GenerationConfig(max_new_tokens=62))
    with pytest.raises(UsageError, match="generation.max_new_tokens=63 leaves no room for a prompt in max_len 64: "
                                         "use at most 62"):
        check_max_len(64, demo, GenerationConfig(max_new_tokens=63))
    job = _run("generation.max_new_tokens=100000", "input=nowhere.jsonl")
    assert job.returncode == 2 and job.stderr.strip().splitlines() == [
        f"error: generation.max_new_tokens=100000 leaves no room for a prompt in max_len {demo.max_seq_len}: "
        f"use at most {demo.max_seq_len - 2}"]


def test_a_plan_for_a_rank_count_the_model_cannot_take_is_refused():
    job = _run("plan=true", "ranks=3")
    assert job.returncode == 2 and "tensor-parallel size 3 does not divide this model" in job.stderr
    assert "valid sizes:" in job.stderr and len(job.stderr.strip().splitlines()) == 1


def test_relative_paths_are_the_users_and_glm_tp_paths_fall_back_to_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("glm_tp/demo") == DEMO  # the default checkpoint, from any folder
    assert resolve_path("glm_tp/configs/generate.yaml") == CONFIG_DIR / "generate.yaml"
    assert resolve_path("prompts.jsonl") == Path("prompts.jsonl")  # the user's, even before it exists
    assert resolve_path("cli") == Path("cli")  # only glm_tp/... names the package's files
    (tmp_path / "glm_tp" / "demo").mkdir(parents=True)
    assert resolve_path("glm_tp/demo") == Path("glm_tp/demo")  # the user's own folder wins

def _run(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_tp.generate", *overrides], cwd=ROOT, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_a_bad_setting_stops_the_run_before_loading_with_one_line():
    job = _run("max_len=4096")
    assert job.returncode == 2
    assert job.stderr.strip().splitlines() == [
        "error: max_len=4096 is over the model's maximum of 96 tokens: use max_len <= 96, or leave it unset "
        "for the maximum"]
    assert "loading" not in job.stdout + job.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("override", ["hardware=8xA100-80G", "device=cuda"])
def test_asking_for_cuda_without_a_gpu_says_use_cpu(override):
    job = _run(override)
    assert job.returncode == 2
    assert job.stderr.strip().splitlines() == ["error: no CUDA device: use hardware=cpu (or device=cpu)"]


def test_a_rank_count_the_model_cannot_take_is_told_the_sizes_that_work():
    # any shard count loads at any TP size that divides the model; others get the sizes that do
    with pytest.raises(ValueError, match="valid sizes: 1, 2, 4, 8, 16, 32"):
        PRESETS["glm-130b"].check_tp(3)


@pytest.mark.parametrize("arg, meant", [
    ("max_new_tokens=2", "generation.max_new_tokens=2"), ("+max_new_tokens=2", "generation.max_new_tokens=2"),
    ("generation.max_new_tokns=2", "generation.max_new_tokens=2"), ("server.prot=9", "server.port=9"),
    ("batchsize=4", "batch_size=4"),
])
def test_an_unknown_key_on_the_command_line_names_the_key_it_meant(arg, meant):
    with pytest.raises(UsageError, match=f"did you mean {meant}"):
        check_overrides([arg])


def test_known_keys_and_groups_pass_the_override_check():
    check_overrides(["preset=tiny", "hardware=cpu", "generation.stop=[a]", "server.port=0", "batch_size=2",
                     "hydra.run.dir=.", "~tokenizer"])


def test_a_top_level_generation_key_fails_before_hydra_in_one_line():
    done = subprocess.run([sys.executable, "-m", "glm_tp.generate", "max_new_tokens=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: unknown setting 'max_new_tokens': did you mean generation.max_new_tokens=2? "
        "(glm_tp/configs/generate.yaml lists the keys)"]
