"""The entry point: `torchrun --nproc_per_node N -m glm_tp.generate [key=value ...]` (or python -m for one rank).

Every rank loads its shard; rank 0 runs the front end (TTY, a JSONL batch job or the HTTP server) and the other ranks
follow its commands. Configuration is hydra's, from the package's configs/ (glm_tp/configs/generate.yaml lists the keys).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import hydra
import torch
from omegaconf import DictConfig

from glm_tp.checkpoints.load import load_model, resolve_config
from glm_tp.checkpoints.release import CheckpointError, read_metadata, recorded_stages
from glm_tp.checkpoints.sources import Source, open_source, source_bits
from glm_tp.cli.output import plain_warnings
from glm_tp.cli.planner import GiB, Plan, refusal, with_prefix_cache
from glm_tp.cli.settings import (
    check_stage_layers,
    CONFIG_DIR,
    UsageError,
    check_config,
    check_device,
    check_max_len,
    check_overrides,
    resolve_path,
)
from glm_tp.config import (
    ModelConfig,
    SpecialTokens,
    default_dtype,
    parse_dtype,
    parse_quant,
)
from glm_tp.engine.coordinator import Coordinator, worker_loop
from glm_tp.engine.core import Engine
from glm_tp.engine.types import GenerationConfig
from glm_tp.parallel.dist import (
    TPContext,
    die_with_launcher,
    failure_line,
    init_distributed,
    shutdown,
    stop_peers,
)
from glm_tp.parallel.pipeline import RankLayout
from glm_tp.text.tokenizer import (
    GLMTokenizer,
    IdsOnlyTokenizer,
    TokenizerError,
    find_model_file,
    load_tokenizer,
)


def recorded_split(cfg: DictConfig) -> list[int] | None:
    """The stage split a checkpoint written per stage records, when this run loads it per stage (its
    pipeline_parallel); None otherwise."""
    checkpoint = resolve_path(cfg.checkpoint)
    recorded = recorded_stages(read_metadata(checkpoint)) if checkpoint.is_dir() else None
    return recorded if recorded and int(cfg.pipeline_parallel) == len(recorded) > 1 else None


def own_source(cfg: DictConfig) -> Source:
    """The checkpoint as this rank reads it: of one written per stage and loaded per stage, only this rank's
    stage's files, so a node needs nothing but its own stage's folder."""
    checkpoint, recorded = resolve_path(cfg.checkpoint), recorded_split(cfg)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if recorded is None or world % len(recorded):  # ranks that cannot form the stages: load_model says so
        return open_source(checkpoint)
    return open_source(checkpoint, RankLayout.of_world(world, len(recorded)).stage_of(rank))


def model_config(cfg: DictConfig) -> ModelConfig:
    """The model's shape from the preset or the checkpoint's glm_tp.json: no weights are read."""
    checkpoint = resolve_path(cfg.checkpoint)
    source = own_source(cfg) if cfg.model is None or checkpoint.exists() else None
    return resolve_config(source.model_config() if source else None, cfg.model, None)


def make_plan(cfg: DictConfig, model_cfg: ModelConfig, tp_size: int, device_type: str,
              memory: float | None = None) -> Plan:
    """The memory plan for this run, its prefix cache sized for `memory` (per rank, when known); with a model
    preset it needs no checkpoint on disk."""
    checkpoint = resolve_path(cfg.checkpoint)
    source = own_source(cfg) if checkpoint.exists() else None
    bits = parse_quant(cfg.quant)
    if bits is None:  # as the checkpoint holds: its metadata says (no weight file opened), or its first QKV shows
        bits = source_bits(source, model_cfg.hidden_size, open_weights=False) if source else 0
    dtype = parse_dtype(cfg.dtype) if cfg.dtype else default_dtype(device_type)
    sizes = check_stage_layers(cfg.stage_layers) or recorded_split(cfg)  # unset: the checkpoint's own split
    plan = Plan(model_cfg, tp_size, torch.tensor([], dtype=dtype).element_size(), bits, int(cfg.batch_size),
                int(cfg.max_len or model_cfg.max_seq_len), "cuda" if device_type == "cuda" else "cpu",
                int(cfg.pipeline_parallel), tuple(sizes) if sizes else None)
    tokens = cfg.get("prefix_cache_tokens")
    return with_prefix_cache(plan, None if tokens is None else int(tokens), memory)


def device_bytes(cfg: DictConfig, device: torch.device) -> float | None:
    if cfg.device_memory_gib:
        return float(cfg.device_memory_gib) * GiB
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return cpu_memory_bytes()


def cpu_memory_bytes() -> float | None:
    """This rank's share of the memory the host has available now (Linux: MemAvailable, split between the
    host's ranks), so a CPU run that cannot fit (a 128k-context KV cache, say) is one line, not an OOM kill."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def tokenizer_file(cfg: DictConfig, gen: GenerationConfig) -> Path | None:
    """The tokenizer model: tokenizer=, else the one the checkpoint names or holds. None for a JSONL job of token
    ids alone when there is none: it runs without one. Checked before loading, so a missing tokenizer costs no
    model load; the error names the first line that needs one."""
    source = own_source(cfg)
    path = resolve_path(cfg.tokenizer) if cfg.tokenizer else source.root / (source.metadata or {}).get("tokenizer", "")
    try:
        return find_model_file(path)
    except TokenizerError as e:
        if cfg.tokenizer or cfg.input in ("interactive", "http"):  # typed text, or clients that may send it
            raise
        job = resolve_path(cfg.input)
        line = first_text_line(job, gen)
        if line is None:
            return None
        raise TokenizerError(f"line {line} of {job} needs a tokenizer (a text prompt, chat messages or stop "
                             f"strings; a job of prompt_token_ids alone needs none): {e}") from None


def first_text_line(path: Path, gen: GenerationConfig) -> int | None:
    """The first line of a JSONL job that needs a tokenizer, read by the batch runner's own parser (without a
    chat format, chat messages come back as text); None when every line is token ids or an error record."""
    from glm_tp.frontends.batch import read_items
    for item in read_items(path, gen):
        if any(r.text is not None or (r.config or gen).stop for r in item.requests):
            return item.line
    return None


def load_tokenizer_for(checkpoint: Path, special: SpecialTokens, file: Path | None) -> GLMTokenizer:
    """`file` from tokenizer_file; None: the ids-only stand-in. The checkpoint's metadata says which kind it is
    (tokenizer_kind) and where its special tokens are (tokenizer_specials: ChatGLM2/3's, GLM-4's)."""
    if file is None:
        return IdsOnlyTokenizer(special)
    # a release layout's metadata is its glm_tp.json (opening the source would need every stage's files)
    meta = (read_metadata(checkpoint) if (checkpoint / "latest").is_file() else open_source(checkpoint).metadata) or {}
    return load_tokenizer(file, special, text_offset=meta.get("tokenizer_offset"),
                          whitespace=bool(meta.get("tokenizer_whitespace")), kind=meta.get("tokenizer_kind"),
                          specials=meta.get("tokenizer_specials"))


def load_engine(cfg: DictConfig, tp: TPContext, gen: GenerationConfig, tokenizer: Path | None,
                stage_sizes: list[int] | None = None, prefix_cache_tokens: int = 0) -> Engine:
    """Every rank loads its shard (of its pipeline stage: stage_sizes, the plan's layers per stage), then the
    ranks compare notes: a rank that could not load (a truncated shard, a missing file) stops every rank with
    its message, before any of them says it is ready. The ranks' prefix caches are the smallest any rank
    planned (each sized its own from its own memory)."""
    engine, error = None, None
    prefix_cache_tokens = min(tp.all_gather_object(prefix_cache_tokens))
    try:
        checkpoint = resolve_path(cfg.checkpoint)
        model = load_model(checkpoint, model=cfg.model, dtype=cfg.dtype, quant=cfg.quant, tp=tp, kernels=cfg.kernels,
                           lm_head=cfg.lm_head, verify=bool(cfg.verify), pipeline_parallel=int(cfg.pipeline_parallel),
                           stage_sizes=stage_sizes)
        tok = load_tokenizer_for(checkpoint, model.cfg.special, tokenizer)
        engine = Engine(model, tok, gen, max_batch=int(cfg.batch_size),
                        max_len=int(cfg.max_len) if cfg.max_len else None, prefix_cache_tokens=prefix_cache_tokens,
                        pipeline_lanes=None if cfg.pipeline_lanes is None else int(cfg.pipeline_lanes))
    except (CheckpointError, TokenizerError, ValueError) as e:
        error = str(e)
    except (MemoryError, torch.OutOfMemoryError) as e:
        first = str(e).strip().split(". ")[0] or type(e).__name__
        error = (f"out of memory while loading ({first}): try quant=int8 or quant=int4, more ranks, "
                 f"or a smaller batch_size")
    failed = [(rank, message) for rank, message in enumerate(tp.all_gather_object(error)) if message]
    if failed:
        rank, message = failed[0]
        alike = len(failed) == tp.size and all(m == message for _, m in failed)
        raise UsageError(message if alike else f"rank {rank}: {message}")
    assert engine is not None
    return engine


def follow(tp: TPContext, engine: Engine) -> None:
    """Ranks > 0. torchrun passes a SIGTERM or SIGHUP to every rank; the workers ignore it and keep following
    rank 0, which finishes its work and then sends the shutdown. A SIGINT (Ctrl-C at torchrun) ends every
    rank at once: rank 0 says so, the workers leave without a word as soon as their collective returns."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    worker_loop(tp, engine)


def setup(cfg: DictConfig) -> tuple[TPContext, Engine, Path | None, TextIO | None] | None:
    """Checks, then loading on every rank; returns the batch output path too (and on rank 0 the output file,
    claimed), None in plan mode. Whatever fails here fails alike on every rank (load_engine shares loading
    failures; a claimed output fails rank 0 alone, before loading, and torchrun then stops the others): one
    UsageError."""
    try:
        gen = check_config(cfg)
        model_cfg = model_config(cfg)
        check_max_len(cfg.max_len, model_cfg, gen)
        if cfg.plan:
            ranks = int(cfg.ranks or os.environ.get("WORLD_SIZE", "1"))
            stage_tp = RankLayout.of_world(ranks, int(cfg.pipeline_parallel)).tp
            model_cfg.check_tp(stage_tp)
            memory = float(cfg.device_memory_gib) * GiB if cfg.device_memory_gib else None
            plan = make_plan(cfg, model_cfg, stage_tp, "cuda" if cfg.device == "cuda" else "cpu", memory)
            print(plan.table(memory))
            if memory is not None and not plan.fits(memory):
                print(refusal(plan, memory))
            return None
        check_device(cfg.device)
        output, claimed = None, None
        if cfg.input not in ("interactive", "http"):  # before loading: a bad output path must not cost a model load
            from glm_tp.frontends.results_file import check_output, claim_output
            output = check_output(resolve_path(cfg.input), str(cfg.output) if cfg.output else None)  # "dir/" stays
            if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes: a second run stops here, before loading
                claimed = claim_output(output)
        tokenizer = tokenizer_file(cfg, gen)
        tp = init_distributed(cfg.device, timeout_s=float(cfg.timeout_s))
        if cfg.ranks and int(cfg.ranks) != tp.size:
            raise UsageError(f"this hardware preset runs {cfg.ranks} ranks but {tp.size} were started: "
                             f"use torchrun --nproc_per_node {cfg.ranks}, or set ranks=null")
        stage_tp = RankLayout.of_world(tp.size, int(cfg.pipeline_parallel)).tp
        model_cfg.check_tp(stage_tp)  # before the plan, which cuts each tensor for this many ranks
        memory = device_bytes(cfg, tp.device)
        plan = make_plan(cfg, model_cfg, stage_tp, tp.device.type, memory)  # its stage split is the one loaded
        if memory is not None and not plan.fits(memory):
            raise UsageError(refusal(plan, memory))
        return tp, load_engine(cfg, tp, gen, tokenizer, plan.split.sizes(), plan.prefix_tokens), output, claimed
    except (CheckpointError, TokenizerError, ValueError) as e:
        raise UsageError(str(e)) from None


def run(cfg: DictConfig) -> int:
    ready = setup(cfg)
    if ready is None:
        return 0
    tp, engine, output, claimed = ready
    if not tp.is_first:
        follow(tp, engine)
        return 0
    coordinator = Coordinator(tp, engine)
    try:
        if cfg.input == "interactive":
            from glm_tp.frontends.tty import run_tty
            run_tty(coordinator, color=str(cfg.color))
        elif cfg.input == "http":
            from glm_tp.server.run import ServerSettings, run_server
            settings = ServerSettings(**cfg.server)
            settings.model_name = settings.model_name or resolve_path(cfg.checkpoint).name
            coordinator.max_waiting = settings.max_waiting  # one bound: the coordinator's QueueFull is a 503
            run_server(coordinator, engine.default, settings)
        else:
            from glm_tp.frontends.batch import run_batch
            run_batch(coordinator, resolve_path(cfg.input), output, claimed)
    except (RuntimeError, ConnectionError, KeyboardInterrupt):
        raise  # a failed collective, or a SIGINT that every rank got: no shutdown to send
    except BaseException:
        coordinator.shutdown()
        raise
    coordinator.shutdown()
    return 0


def report(message: str) -> None:
    """One line on stderr; under torchrun also the rank's error file, which torchrun prints as the root
    cause at the bottom of its failure report."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        stamp = str(int(time.time()))
        Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": {
            "py_callstack": message, "timestamp": stamp}}}))
    print(message, file=sys.stderr, flush=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="generate", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    die_with_launcher()
    rank = int(os.environ.get("RANK", "0"))
    where = f" on rank {rank}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    code = 0
    try:
        with plain_warnings():  # e.g. the loader's lossy re-quantization: one line, not a source line
            code = run(cfg)
    except UsageError as e:  # the same on every rank: rank 0 reports it and fails the job, the others leave
        if rank == 0:
            report(f"error: {e}")
            code = 2
    except (CheckpointError, TokenizerError, ValueError) as e:
        report(f"error{where}: {e}")
        code = 2
    except (RuntimeError, ConnectionError) as e:  # a lost rank surfaces as a failed collective
        report(f"error on rank {rank}: lost contact with the other ranks ({failure_line(e)}); shutting down")
        stopped = stop_peers()
        if stopped:
            report(f"glm-tp: stopped the other ranks on this host (pids {', '.join(map(str, stopped))})")
        code = 1
    except KeyboardInterrupt:
        if rank == 0:
            print("glm-tp: interrupted", file=sys.stderr, flush=True)
        code = 130
    shutdown()
    if code:
        sys.exit(code)


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
    except UsageError as e:  # before hydra, whose advice (+key=value) would add a key nothing reads
        if int(os.environ.get("RANK", "0")) == 0:
            report(f"error: {e}")
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
