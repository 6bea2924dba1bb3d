"""Checkpoints in the GLM-130B release layout.

    <root>/latest                               the iteration: a number or "release"
    <root>/<iter>/mp_rank_XX_model_states.pt    {"module": state_dict} of tensor-parallel rank XX
    <root>/glm_tp.json                          optional metadata (ours; the release has none)

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import ModelConfig, dtype_name
from .partition import QUANTIZED_LINEARS, Layout, is_ignored, layout_of, short_name

METADATA_FILE = "glm_tp.json"
LAYOUT_VERSION = 1
_SHARD_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint problem, with the fix in the message."""


@dataclass
class CheckpointInfo:
    root: Path
    iteration: str
    shards: list[Path]
    metadata: dict[str, Any] | None = None

    @property
    def tp(self) -> int:
        return len(self.shards)

    @property
    def quant_bits(self) -> int | None:
        """From the metadata when present; None means "look at the tensors"."""
        return None if self.metadata is None else int(self.metadata.get("quant_bits", 0))

    def model_config(self) -> ModelConfig | None:
        if self.metadata and "model" in self.metadata:
            return ModelConfig.from_dict(self.metadata["model"])
        return None


def shard_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def inspect(root: str | os.PathLike) -> CheckpointInfo:
    """Find the iteration folder and its shards; check they are complete."""
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
    ranks = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD_RE.match(p.name)))
    if not ranks:
        raise CheckpointError(f"{folder} holds no mp_rank_XX_model_states.pt shard: the checkpoint is incomplete")
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise CheckpointError(f"{folder} lacks shard(s) {', '.join(shard_name(r) for r in missing)}: "
                              f"the checkpoint is incomplete (re-copy or re-extract it)")
    return CheckpointInfo(root, iteration, [folder / shard_name(r) for r in ranks], read_metadata(root))


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


def write_latest(root: str | os.PathLike, iteration: str, metadata: dict[str, Any] | None = None) -> None:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if metadata is not None:
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


def detect_quant_bits(state: dict[str, torch.Tensor], cfg: ModelConfig, tp: int) -> int:
    """0 for a float checkpoint, else 8 or 4, read off the first QKV weight."""
    qkv = state.get("transformer.layers.0.attention.query_key_value.weight")
    if qkv is None or qkv.is_floating_point():
        return 0
    return 4 if qkv.shape[-1] * 2 == cfg.hidden_size else 8


@dataclass
class LoadReport:
    loaded: int = 0
    unexpected: list[str] = field(default_factory=list)


def load_shard_into(model: torch.nn.Module, state: dict[str, torch.Tensor], mapped: bool, path: Path,
                    checkpoint_bits: int, progress: bool = True) -> LoadReport:
    """Fill `model` (one rank's GLMModel, built with the wanted dtype and quantization) from a shard.

    checkpoint_bits: what the shard holds (0 = float). A float shard into a quantized model is
    quantized tensor by tensor on the model's device; a quantized shard needs a model of the same bits.
    """
    model_bits = model.quant_bits
    if checkpoint_bits and checkpoint_bits != model_bits:
        wanted = f"INT{model_bits}" if model_bits else "a float model"
        raise CheckpointError(f"{path} holds INT{checkpoint_bits} weights but {wanted} was asked: set "
                              f"quant=int{checkpoint_bits}, or load the fp16 checkpoint to quantize it yourself")
    params = dict(model.named_parameters())
    if not checkpoint_bits:  # a float shard has no scales; a quantized model computes them
        params = {n: p for n, p in params.items() if not n.endswith(".weight_scale")}
    missing = [n for n in params if n not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s), e.g. {missing[0]}: "
                              f"{_missing_hint(missing)}")
    report = LoadReport(unexpected=[n for n in state if n not in params and not is_ignored(n)
                                    and not n.endswith(".weight_scale")])
    modules = dict(model.named_modules())
    zero_copy_ok = model.device.type == "cpu"
    for name in tqdm(params, desc=f"loading {path.name}", disable=not progress, unit="tensor", leave=False):
        param, t = params[name], state[name]
        owner = modules[name.rsplit(".", 1)[0]]
        quantize_here = name.endswith(".weight") and getattr(owner, "bits", 0) and t.is_floating_point()
        expected = (owner.out_features, owner.in_features) if quantize_here else tuple(param.shape)
        if tuple(t.shape) != expected:
            raise CheckpointError(_shape_message(name, expected, tuple(t.shape)))
        if quantize_here:
            owner.load_float_weight_(t)
        elif zero_copy_ok and t.dtype == param.dtype:
            param.data = t  # CPU, same dtype: use the mapped file pages directly
            report.loaded += 1
            continue
        else:
            param.copy_(t)
        if mapped:
            release_pages(t)
        report.loaded += 1
    return report


def _missing_hint(missing: list[str]) -> str:
    if any(n.endswith(".weight_scale") for n in missing):
        return "the model expects a quantized checkpoint; load the fp16 one with quant=int8/int4 instead"
    layers = {short_name(n) for n in missing}
    return (f"the checkpoint does not match this model shape ({len(layers)} distinct tensor kinds missing); "
            f"check the model preset or --layers")


def _shape_message(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    head = f"tensor {name} has shape {list(found)} in the checkpoint but the model expects {list(expected)}"
    if len(found) == len(expected) == 2 and found[0] == expected[0] and short_name(name).split(".")[-2] in \
            {q.split(".")[-1] for q in QUANTIZED_LINEARS} and found[1] * 2 == expected[1]:
        return f"{head}: this looks like an INT4-packed weight; set quant=int4"
    layout = layout_of(name)
    split_dim = {Layout.COLUMN: 0, Layout.GLU: 0, Layout.ROW: len(expected) - 1}.get(layout)
    if split_dim is not None and len(found) == len(expected) and all(
            f == e for i, (f, e) in enumerate(zip(found, expected)) if i != split_dim):
        f, e = found[split_dim], expected[split_dim]
        if max(f, e) % min(f, e) == 0:
            return (f"{head}: the checkpoint seems cut for a tensor-parallel size {e / f:g}x the model's; "
                    f"run tools/repartition.py to reshard it for the number of ranks you start")
    return f"{head}: the model shape does not match the checkpoint; check the model preset (or --layers)"
