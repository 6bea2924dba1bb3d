"""Checkpoints in the GLM-130B release layout.

    <root>/latest                               the iteration: a number or "release"
    <root>/<iter>/mp_rank_XX_model_states.pt    {"module": state_dict} of tensor-parallel rank XX
    <root>/glm_tp.json                          optional metadata (ours; the release has none)

Written per pipeline stage (`glm-tp-repartition --pp`), each stage's shards hold only that stage's tensors:

    <root>/<iter>/stage_SS/mp_rank_XX_model_states.pt   TP rank XX of pipeline stage SS
    <root>/glm_tp.json                                  records the split: "stage_layers" (layers per stage)

Each rank opens only its own shard, memory-mapped, and moves one tensor at a time into its model,
so host RAM stays near what the rank keeps. Every problem is reported as a one-line
`CheckpointError` that names the fix.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glm_tp.checkpoints.integrity import file_records, hash_problems, size_problem
from glm_tp.config import ModelConfig, dtype_name
from glm_tp.parallel.partition import QUANTIZED_LINEARS, Layout, layout_of, short_name

METADATA_FILE = "glm_tp.json"
LAYOUT_VERSION = 1
_SHARD_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_STAGE_RE = re.compile(r"^[^/]+/stage_\d+/")  # a shard of one stage: <iter>/stage_SS/...


class CheckpointError(RuntimeError):
    """A checkpoint problem, with the fix in the message."""


@dataclass
class CheckpointInfo:
    root: Path
    iteration: str
    shards: list[Path]  # stage-major when the checkpoint is written per stage
    metadata: dict[str, Any] | None = None
    stages: int = 1  # how many stages' shards `shards` holds

    @property
    def tp(self) -> int:
        return len(self.shards) // self.stages

    def model_config(self) -> ModelConfig | None:
        if self.metadata and "model" in self.metadata:
            return ModelConfig.from_dict(self.metadata["model"])
        return None


def shard_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def stage_folder(stage: int) -> str:
    return f"stage_{stage:02d}"


def recorded_stages(metadata: dict[str, Any] | None) -> list[int] | None:
    """The layers of each stage of a checkpoint written per pipeline stage, or None (one set of shards)."""
    sizes = (metadata or {}).get("stage_layers")
    if sizes is None:
        return None
    if not isinstance(sizes, list) or not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                        for n in sizes):
        raise CheckpointError(f"{METADATA_FILE} has stage_layers={sizes!r}: expected a list of whole numbers >= 1, "
                              f"one per pipeline stage; re-copy the checkpoint or repartition it again")
    return sizes


def inspect(root: str | os.PathLike, stage: int | None = None) -> CheckpointInfo:
    """Find the iteration folder and its shards; check they are complete. A checkpoint written per stage:
    every stage's shards (stage-major), or only those of `stage`."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist: point checkpoint= at the folder that holds 'latest'")
    latest = root / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{latest} is missing: a release-format checkpoint needs a 'latest' file naming its "
                              f"iteration folder (write e.g. '49300' or 'release' into it)")
    iteration = latest.read_text().strip()
    folder = root / iteration
    if not folder.is_dir():
        raise CheckpointError(f"{latest} names iteration '{iteration}' but {folder} does not exist: fix 'latest' or "
                              f"restore the folder")
    meta = read_metadata(root)
    sizes = recorded_stages(meta)
    if sizes is None:
        return CheckpointInfo(root, iteration, _shards(folder), meta)
    if stage is not None and not 0 <= stage < len(sizes):
        raise CheckpointError(f"{root} is written for {len(sizes)} pipeline stages (stage_layers={sizes}), so it has "
                              f"no stage {stage}")
    tp = int(meta.get("tp") or 0) if meta else 0  # the shards each stage must have (so a missing last one is named)
    shards: list[Path] = []
    for s in range(len(sizes)) if stage is None else [stage]:
        found = _shards(folder / stage_folder(s), tp)
        tp = tp or len(found)
        if len(found) != tp:
            raise CheckpointError(f"{folder / stage_folder(s)} holds {len(found)} shard(s) but the checkpoint's "
                                  f"stages have {tp}: the checkpoint is incomplete (re-copy it)")
        shards += found
    return CheckpointInfo(root, iteration, shards, meta, len(sizes) if stage is None else 1)


def _shards(folder: Path, count: int = 0) -> list[Path]:
    """The mp_rank_XX shards of `folder`, in rank order: all of them, from 00 on (at least `count`)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing: the checkpoint is incomplete (re-copy it)")
    ranks = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD_RE.match(p.name)))
    if not ranks:
        raise CheckpointError(f"{folder} holds no mp_rank_XX_model_states.pt shard: the checkpoint is incomplete")
    missing = sorted(set(range(max(count, max(ranks) + 1))) - set(ranks))
    if missing:
        raise CheckpointError(f"{folder} lacks shard(s) {', '.join(shard_name(r) for r in missing)}: "
                              f"the checkpoint is incomplete (re-copy or re-extract it)")
    return [folder / shard_name(r) for r in ranks]


def read_metadata(root: Path) -> dict[str, Any] | None:
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): fix or delete it (it is optional)") from None
    if int(meta.get("layout_version", 1)) > LAYOUT_VERSION:
        raise CheckpointError(f"{path} has layout version {meta['layout_version']}, newer than this glm-tp "
                              f"understands ({LAYOUT_VERSION}): upgrade glm-tp")
    return meta


def check_files(root: Path, metadata: dict[str, Any] | None, verify: bool = False, rank: int = 0, ranks: int = 1,
                progress: bool = False, stage: str | None = None) -> dict[str, str]:
    """Sizes of every recorded file (always: raises at once); with verify, the SHA-256 of this rank's share of
    the files (file i goes to rank i % ranks), returned as {file: problem} for the caller to share. stage: the
    one stage folder (`<iter>/stage_SS`) whose shards are checked; other stages' are not this rank's."""
    records = {rel: record for rel, record in ((metadata or {}).get("files") or {}).items()
               if stage is None or not _STAGE_RE.match(rel) or rel.startswith(stage + "/")}
    for rel, record in records.items():
        problem = size_problem(root, rel, record)
        if problem:
            raise CheckpointError(problem)
    if not verify:
        return {}
    if not records:
        raise CheckpointError(f"{root} records no checksums (only checkpoints written by glm-tp's tools do): "
                              f"load it without verify=true, or record them from a copy you trust with tools/verify.py CKPT --record")
    names = sorted(records)[rank::ranks]
    return hash_problems(root, records, names, progress)


def make_metadata(cfg: ModelConfig, tp: int, dtype: torch.dtype, quant_bits: int = 0, **extra: Any) -> dict[str, Any]:
    return {"format": "glm-130b-release", "layout_version": LAYOUT_VERSION, "model": cfg.to_dict(), "tp": tp,
            "dtype": dtype_name(dtype), "quant_bits": quant_bits, **extra}


def write_shard(root: str | os.PathLike, iteration: str, rank: int, state_dict: dict[str, torch.Tensor]) -> Path:
    folder = Path(root) / iteration
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / shard_name(rank)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"module": state_dict}, tmp)
    tmp.replace(path)  # a crash never leaves a half-written shard under the real name
    return path


def write_latest(root: str | os.PathLike, iteration: str, metadata: dict[str, Any] | None = None,
                 progress: bool = False) -> None:
    """Name the iteration; with metadata, record it with each shard's (and the tokenizer's) size and SHA-256."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if metadata is not None:
        stages = recorded_stages(metadata)  # per stage: the stage folders' shards, nothing else
        folders = [root / iteration / stage_folder(s) for s in range(len(stages))] if stages else [root / iteration]
        files = sorted(p for folder in folders for p in folder.iterdir() if _SHARD_RE.match(p.name))
        if metadata.get("tokenizer") and (root / metadata["tokenizer"]).is_file():
            files.append(root / metadata["tokenizer"])
        metadata = {**metadata, "files": file_records(root, files, progress)}
        (root / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    (root / "latest").write_text(f"{iteration}\n")


def open_shard(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Memory-map one shard; tensors are read from disk only when touched.

    Returns the state dict and whether it is memory-mapped (legacy pre-zip files are read whole).
    """
    if not path.is_file():
        raise CheckpointError(f"shard {path} is missing: the checkpoint is incomplete")
    mapped = True
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e) or "zip" not in str(e):
                raise
            mapped = False
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse means a bad file
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"shard {path} cannot be read ({first}): it is truncated or corrupt; "
                              f"re-copy it (compare its checksum) or re-create it") from None
    state = obj.get("module", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"shard {path} does not hold a {{'module': state_dict}} dict: not a GLM checkpoint")
    return state, mapped


def release_pages(t: torch.Tensor) -> None:
    """Drop the host pages of a tensor read from a memory-mapped shard once it has been copied.

    The mapping is private and never written, so the kernel simply re-reads a page from the file if
    it is touched again. This keeps a rank's RSS near one tensor instead of the whole shard.
    """
    if t.device.type != "cpu" or t.numel() == 0 or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def shape_message(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    head = f"tensor {name} has shape {list(found)} in the checkpoint but the model expects {list(expected)}"
    if len(found) == len(expected) == 2 and found[0] == expected[0] and short_name(name).split(".")[-2] in \
            {q.split(".")[-1] for q in QUANTIZED_LINEARS} and found[1] * 2 == expected[1]:
        return f"{head}: this looks like an INT4-packed weight; set quant=int4"
    layout = layout_of(name)
    split_dim = {Layout.COLUMN: 0, Layout.GLU: 0, Layout.ROW: len(expected) - 1}.get(layout)
    if split_dim is not None and len(found) == len(expected) and all(
            f == e for i, (f, e) in enumerate(zip(found, expected)) if i != split_dim):
        f, e = found[split_dim], expected[split_dim]
        if f < e and e % f == 0:
            return (f"{head}: the checkpoint seems to hold 1/{e / f:g} of each tensor (shards missing, or files of "
                    f"another checkpoint); restore the missing shards")
    return f"{head}: the model shape does not match the checkpoint; check the model preset (or --layers)"
