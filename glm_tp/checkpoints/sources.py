"""Where weights come from: named tensors, memory-mapped, from any checkpoint layout glm-tp reads.

- the GLM-130B release layout (`latest`, `<iter>/mp_rank_XX_model_states.pt`), any number of shards:
  every split tensor is cut across the shards by partition.py's rule (`Source.cut`); written per pipeline
  stage (`<iter>/stage_SS/`), the whole checkpoint (every stage's shards) or one stage's shards only;
- one unsharded file (`.pt`, `.bin` or `.safetensors`): every tensor whole;
- the Hugging Face layouts of ChatGLM-6B, ChatGLM2/3 and GLM-4 (THUDM's and transformers' GlmForCausalLM):
  `config.json` and `pytorch_model-0000X-of-0000N.bin` with `pytorch_model.bin.index.json`, or `.safetensors`
  shards with `model.safetensors.index.json`, or one `pytorch_model.bin` / `model.safetensors`: every tensor
  whole, in the file the index names, served under glm-tp's names (names.py); GlmForCausalLM's separate q, k
  and v projections are served as one fused QKV (`FusedRows`) that reads only the rows a slice covers.

Nothing is read until a rank asks for a slice (`Part.narrow`); then only the pages of that slice are
touched. Nothing is ever downloaded: a missing file is a one-line `CheckpointError` naming it.
`source_bits` is the one rule for what precision a checkpoint holds.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from glm_tp.checkpoints import names as tensor_names
from glm_tp.checkpoints.hf import config_metadata
from glm_tp.checkpoints.release import (
    CheckpointError,
    inspect,
    open_shard,
    read_metadata,
    shard_name,
)
from glm_tp.config import ModelConfig
from glm_tp.parallel.partition import PRECISION_PROBE

_DTYPE_NAMES = {"fp16": ("float16",), "bf16": ("bfloat16",), "fp32": ("float32",)}
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I8": torch.int8,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64}
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".pt", ".bin", ".safetensors", ".pth")


class SafetensorsPart:
    """A tensor of a .safetensors file: shape and dtype known, bytes read only for the slice asked."""

    def __init__(self, handle: Any, name: str):
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = SAFETENSORS_DTYPES[self._slice.get_dtype()]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        if self.shape:
            index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]


class FusedRows:
    """Tensors stored apart and served as one, joined along dim 0 (GlmForCausalLM's q, k and v projections as
    glm-tp's fused QKV): a slice of rows reads only the stored tensors it covers."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim != 0:
            return torch.cat([p.narrow(dim, start, length) for p in self.parts])
        pieces, offset = [], 0
        for p in self.parts:
            lo, hi = max(start, offset), min(start + length, offset + p.shape[0])
            if lo < hi:
                pieces.append(p.narrow(0, lo - offset, hi - lo))
            offset += p.shape[0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


Part = Union[torch.Tensor, SafetensorsPart, FusedRows]


@dataclass
class Source:
    """A checkpoint as named tensors. `cut`: each tensor is split across `files` (release layout, part i
    in file i, or in file i % cut_ranks when the files are several stages' shards, stage-major); otherwise
    each tensor is whole in one file."""

    root: Path
    files: list[Path]
    cut: bool
    metadata: dict[str, Any] | None
    layout_name: str
    _parts: dict[str, list[Part]] = field(default_factory=dict)
    _files: dict[str, Path] = field(default_factory=dict)
    mapped: bool = True
    iteration: str = "release"  # the release layout's iteration folder (what `latest` names)
    naming: str = "chatglm"  # how the files name the tensors (names.LAYOUTS): they are served under glm-tp's names
    cut_ranks: int = 0  # pieces per tensor when cut (the TP ranks it was written for); 0: one per file

    @property
    def shards(self) -> int:
        """How many pieces each split tensor comes in."""
        return (self.cut_ranks or len(self.files)) if self.cut else 1

    def model_config(self) -> ModelConfig | None:
        if self.metadata and "model" in self.metadata:
            return ModelConfig.from_dict(self.metadata["model"])
        return None

    def names(self) -> list[str]:
        self._open()
        return list(self._parts)

    def parts(self, name: str) -> list[Part]:
        self._open()
        return self._parts[name]

    def file_of(self, name: str) -> Path:
        self._open()
        return self._files.get(name, self.root)

    def has(self, name: str) -> bool:
        self._open()
        return name in self._parts

    def _open(self) -> None:
        if self._parts:
            return
        fused: dict[str, dict[int, Part]] = {}
        for index, path in enumerate(self.files):
            for stored, part in open_tensors(path, self).items():
                name = tensor_names.ours(stored, self.naming)
                self._files.setdefault(name, path)
                block = tensor_names.fused_part(stored, self.naming)
                if block is not None:
                    fused.setdefault(name, {})[block] = part
                    continue
                if self.cut:
                    # a tensor two stages hold (a tied embedding) is the same in both: either copy serves
                    self._parts.setdefault(name, [None] * self.shards)[index % self.shards] = part
                else:
                    self._parts[name] = [part]
        self._fuse(fused)
        if self.cut:
            holes = [(n, i) for n, ps in self._parts.items() for i, p in enumerate(ps) if p is None]
            if holes:
                name, piece = holes[0]
                lacking = self._files[name].parent / shard_name(piece)  # beside a shard that holds it: its stage's
                raise CheckpointError(f"{lacking} lacks {name}, which the other shards hold: the shards do not "
                                      f"belong together (re-copy or re-create it)")

    def _fuse(self, fused: dict[str, dict[int, Part]]) -> None:
        for name, blocks in fused.items():
            if len(blocks) < len(tensor_names.GLM_QKV):
                lacking = next(i for i in range(len(tensor_names.GLM_QKV)) if i not in blocks)
                stored = tensor_names.theirs(name, self.naming)[lacking]
                raise CheckpointError(f"{self.root} lacks {stored} (its other projections are there): the "
                                      f"checkpoint is incomplete (re-copy it)")
            self._parts[name] = [FusedRows([blocks[i] for i in sorted(blocks)])]


def open_tensors(path: Path, source: Source) -> dict[str, Part]:
    """One file's tensors, memory-mapped (torch zip files, .safetensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            handle = safe_open(str(path), framework="pt")
            return {name: SafetensorsPart(handle, name) for name in handle.keys()}
        except Exception as e:  # noqa: BLE001 - any failure to parse means a bad file
            raise CheckpointError(f"{path} cannot be read ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): "
                                  f"it is truncated or corrupt; re-copy it") from None
    state, mapped = open_shard(path)
    source.mapped = source.mapped and mapped
    return state


def open_source(path: str | os.PathLike, stage: int | None = None) -> Source:
    """Recognise the layout at `path` and check that every file it needs is there. stage: of a checkpoint
    written per pipeline stage, that stage's shards only (None: all of them)."""
    root = Path(path).expanduser()
    if root.is_file():
        return Source(root.parent, [root], False, read_metadata(root.parent), "single file")
    if (root / "latest").exists() or not root.is_dir():
        info = inspect(root, stage)
        what = f"release, {info.tp} shard(s)" if info.stages == 1 and stage is None else \
            f"release per stage, {info.tp} shard(s) x {info.stages if stage is None else f'stage {stage}'}"
        return Source(root, info.shards, True, info.metadata, what, iteration=info.iteration, cut_ranks=info.tp)
    if (root / "config.json").is_file():
        return _hf_source(root)
    weights = sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(weights) == 1:
        return Source(root, weights, False, read_metadata(root), "single file")
    raise CheckpointError(f"{root} is not a checkpoint glm-tp knows: expected 'latest' (GLM-130B release layout), "
                          f"config.json (Hugging Face layout) or a single weights file")


def _hf_source(root: Path) -> Source:
    meta = config_metadata(root)
    for index_name in HF_INDEXES:
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid weight index ({e}): re-copy it") from None
            files = [root / f for f in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{missing[0]} is missing ({index_name} names it): copy it into {root} "
                                      f"(glm-tp never downloads)")
            break
    else:
        single = next((root / f for f in HF_SINGLE if (root / f).is_file()), None)
        if single is None:
            raise CheckpointError(f"{root} has config.json but no weights: expected {' or '.join(HF_INDEXES + HF_SINGLE)} "
                                  f"(glm-tp never downloads; copy the weight files there)")
        files = [single]
    own = read_metadata(root) or {}
    meta.update({k: v for k, v in own.items() if k == "files"})
    return Source(root, files, False, meta, f"Hugging Face, {len(files)} file(s)",
                  naming=meta.get("tensor_names", "chatglm"))


def source_bits(source: Source, hidden_size: int | None, *, open_weights: bool = True) -> int:
    """0 for float weights, else 8 or 4: read off the first QKV weight (INT4 packs two values per byte, so
    its rows hold hidden_size / 2) and checked against the metadata. hidden_size None (no model shape
    known): the metadata must tell INT8 from INT4. open_weights=False: the metadata's word when it has
    one, no weight file opened (a memory plan made before anything loads). One stage's shards: its first
    layer's QKV."""
    meta = source.metadata or {}
    said = int(meta["quant_bits"]) if "quant_bits" in meta else None
    if not open_weights and said is not None:
        return said
    probe = _precision_probe(source)
    part = source.parts(probe)[0] if source.has(probe) else None
    if part is None or part.dtype.is_floating_point:
        found = 0
    elif hidden_size is not None:
        found = 4 if part.shape[-1] * 2 == hidden_size else 8
    elif said:
        found = said
    else:
        raise CheckpointError(f"{source.file_of(probe)} holds quantized weights and no metadata says INT8 or INT4: "
                              f"pass the model preset (--model) to tell them apart")
    if said is not None and part is not None and said != found:
        said_text = f"INT{said}" if said else f"{meta.get('dtype', 'float')} (not quantized)"
        held = f"INT{found}" if found else f"float ({part.dtype})"
        raise CheckpointError(f"{source.file_of(probe)} holds {held} weights but the checkpoint's metadata says "
                              f"{said_text}: the weight files and their metadata do not belong together (re-copy the checkpoint)")
    dtype = meta.get("dtype")
    if part is not None and not found and dtype and str(part.dtype).removeprefix("torch.") not in _DTYPE_NAMES[dtype]:
        raise CheckpointError(f"{source.file_of(probe)} holds {part.dtype} weights but the checkpoint's metadata says "
                              f"{dtype}: the weight files and their metadata do not belong together")
    return found


_QKV = re.compile(r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.weight$")


def _precision_probe(source: Source) -> str:
    """The QKV weight of the first layer the source holds (a later stage's shards start past layer 0)."""
    if source.has(PRECISION_PROBE):
        return PRECISION_PROBE
    layers = sorted(int(m.group(1)) for n in source.names() if (m := _QKV.match(n)))
    return f"transformer.layers.{layers[0]}.attention.query_key_value.weight" if layers else PRECISION_PROBE
