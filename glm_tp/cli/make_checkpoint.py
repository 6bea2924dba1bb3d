"""Write a random, deterministic checkpoint (for tests, benchmarks and trying the loaders).

    glm-tp-make-checkpoint DST --preset tiny --tp 2      # or python tools/make_checkpoint.py ...
    glm-tp-make-checkpoint DST --preset glm-130b --layers 2 --tp 8 --dtype fp16
    glm-tp-make-checkpoint DST --preset tiny-chatglm --layout hf --files 2
    glm-tp-make-checkpoint DST --preset tiny-chatglm2 --layout chatglm2 --quant int4 --chat chatglm3
    glm-tp-make-checkpoint DST --preset tiny-chatglm2 --layout glm-hf

--layout release (the default): the GLM-130B release layout, --tp shards and glm_tp.json. The other layouts
are Hugging Face clones (config.json, model.safetensors or --files N safetensors files with
model.safetensors.index.json, whole tensors under the clone's names), loaded through the same path as a real
clone: --layout hf is ChatGLM-6B's (presets tiny-chatglm, chatglm-6b); --layout chatglm2 is THUDM's ChatGLM2/3
and GLM-4 files, --layout glm-hf transformers' GlmForCausalLM (glm-4-9b-chat-hf) (presets tiny-chatglm2,
chatglm2-6b, chatglm3-6b, glm-4-9b). --quant int4/int8 (hf, chatglm2) writes the linears quantized as
chatglm-6b-int4 and chatglm2-6b-int4 hold them (packed weight + per-row weight_scale). --chat picks the
tokenizer files of the chatglm2 layout: ChatGLM2's, ChatGLM3's (its role tokens named) or GLM-4's (tiktoken
ranks); glm-hf's are GLM-4's tokenizer.json.

The same --seed gives the same model at every --tp and in both layouts (the full tensors are drawn, then
cut). Each full tensor is drawn once and its pieces are written in place into every shard file, so memory
holds one tensor and the time does not grow with --tp (GLM-130B's shape with 2 layers, --tp 8: a few
minutes); the Hugging Face layout holds one weight file's tensors at a time.

Models with a vocabulary under 20000 ids (tiny, tiny-chatglm, tiny-chatglm2, demo) come with a tokenizer, so
glm-tp-generate takes text prompts: the demo model's (tokenizer.model; ice_text.model in ChatGLM-6B's layout;
its 104 pieces are ids 0-103, ChatGLM2/3's specials follow them), or for GLM-4's files a byte-level BPE of 256
ids with the specials after them. Larger shapes are meant for a real tokenizer (tokenizer=); a ChatGLM2/3 or
GLM-4 clone without one gets the released tokenizer's special ids.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from glm_tp.checkpoints.hf import (
    config_metadata,
    config_model,
    hf_config,
    write_hf_layout,
)
from glm_tp.checkpoints.release import make_metadata, shard_name, write_latest
from glm_tp.checkpoints.reshard import ShardWriter
from glm_tp.checkpoints.slices import gather
from glm_tp.checkpoints.synthetic import random_tensor
from glm_tp.checkpoints.tokenizer_files import (
    BYTE_TOKENS,
    appended,
    read_tokenizer,
    write_bpe_files,
    write_released_names,
    write_sentencepiece_files,
)
from glm_tp.cli.output import prepare_output
from glm_tp.cli.settings import DEMO
from glm_tp.config import ModelConfig, get_preset, parse_dtype, parse_quant
from glm_tp.kernels.formats import quantize_rows
from glm_tp.parallel.partition import (
    QUANTIZED_WEIGHTS,
    copy_plan,
    full_shapes,
    layout_for,
    split,
)
from glm_tp.text.tokenizer import ICETK_TEXT_OFFSET, load_tokenizer

DEMO_TOKENIZER = DEMO / "tokenizer.model"
NAMING = {"hf": "chatglm", "chatglm2": "chatglm2", "glm-hf": "glm"}  # --layout -> names.LAYOUTS
CHATS = ("chatglm2", "chatglm3", "glm4")


def write_random(dst: Path, cfg: ModelConfig, tp: int, dtype: torch.dtype, seed: int, iteration: str) -> None:
    """The shards of synthetic.random_shard, written tensor by tensor into every shard at once."""
    shapes = full_shapes(cfg)
    specs: list[dict] = [{} for _ in range(tp)]
    for name, shape in shapes.items():  # each rank's piece shapes, from shapes alone
        for rank, piece in enumerate(split(torch.empty(shape, device="meta"), layout_for(name, cfg), tp)):
            specs[rank][name] = (tuple(piece.shape), dtype)
    writers = [ShardWriter(dst / iteration / shard_name(rank), specs[rank]) for rank in range(tp)]
    total = sum(torch.Size(s).numel() for s in shapes.values())
    with tqdm(total=total, desc="writing shards", unit="param", unit_scale=True) as bar:
        for name, shape in shapes.items():
            full = random_tensor(name, shape, seed, cfg.hidden_size, dtype)
            for rank, writer in enumerate(writers):  # the full tensor is the one source of every rank's slice
                plan = copy_plan(layout_for(name, cfg), shape, 1, tp, rank)
                writer.write([name], lambda t, part=full, plan=plan: gather(t[name], [part], plan, mapped=False))
            bar.update(full.numel())
            del full
    for writer in writers:
        writer.close()


def write_random_hf(dst: Path, cfg: ModelConfig, dtype: torch.dtype, seed: int, files: int, naming: str = "chatglm",
                    bits: int = 0) -> None:
    """The same full tensors as write_random's, in a Hugging Face layout (`files` safetensors files); bits 4 or 8:
    the linears quantized per row (kernels/formats.py, the format of the -int4 clones)."""
    shapes = full_shapes(cfg)
    with tqdm(total=sum(torch.Size(s).numel() for s in shapes.values()), desc="writing weight files",
              unit="param", unit_scale=True) as bar:
        def draw(names: list[str]) -> dict[str, torch.Tensor]:
            out = {}
            for n in names:
                t = random_tensor(n, shapes[n], seed, cfg.hidden_size, dtype)
                bar.update(t.numel())
                if bits and n.endswith(QUANTIZED_WEIGHTS):
                    out[n], out[n + "_scale"] = quantize_rows(t, bits)
                else:
                    out[n] = t
            return out
        write_hf_layout(dst, cfg, list(shapes), draw, dtype, files, quant_bits=bits, naming=naming)


def write_tokenizer_files(dst: Path, cfg: ModelConfig, layout: str, chat: str) -> str | None:
    """The tokenizer files a clone of this small model holds: what was written (None: a model too large for them,
    or whose control ids would fall among their text ids; a large one gets the released specials' names)."""
    if layout == "hf":
        tokenizer = bundled_tokenizer(cfg)
        if tokenizer:
            shutil.copy(tokenizer, dst / "ice_text.model")  # where a clone keeps it (hf.config_metadata)
        return "the demo tokenizer" if tokenizer else None
    if cfg.vocab_size >= ICETK_TEXT_OFFSET:
        template = "glm4" if layout == "glm-hf" else chat
        write_released_names(dst, template)
        return None if template == "chatglm2" else "the released specials' names (tokenizer_config.json)"
    if layout == "glm-hf" or chat == "glm4":
        if BYTE_TOKENS + len(appended("glm4")) > cfg.vocab_size:
            return None
        write_bpe_files(dst, "tokenizers" if layout == "glm-hf" else "tiktoken")
        return "a byte-level BPE tokenizer"
    if load_tokenizer(DEMO_TOKENIZER).text_vocab_size + len(appended(chat)) > cfg.vocab_size:
        return None
    write_sentencepiece_files(dst, DEMO_TOKENIZER, chat)
    return "the demo tokenizer"


def bundled_tokenizer(cfg: ModelConfig) -> Path | None:
    """The demo model's tokenizer, for a model too small for a real one (a vocabulary under icetk's 20000 image
    ids) whose control ids all lie above its pieces; None otherwise."""
    if cfg.vocab_size >= ICETK_TEXT_OFFSET:
        return None
    pieces = load_tokenizer(DEMO_TOKENIZER).text_vocab_size
    s = cfg.special
    return DEMO_TOKENIZER if min(s.mask, s.gmask, s.smask, s.sop, s.eop) >= pieces else None


def model_for(args: argparse.Namespace) -> ModelConfig:
    """The preset, with --layers, checked against the layout; ValueError says what to change."""
    cfg = get_preset(args.preset)
    if args.layout == "release":
        if args.files is not None:
            raise ValueError("--files is for --layout hf, chatglm2 and glm-hf (the release layout has one file per --tp shard)")
        if args.quant or args.chat:
            raise ValueError("--quant and --chat are for the Hugging Face layouts (glm-tp-quantize quantizes shards)")
        cfg = cfg.with_layers(args.layers) if args.layers else cfg
        cfg.check_tp(args.tp)
        return cfg
    if args.tp != 1:
        raise ValueError("the Hugging Face layout holds whole tensors (it loads at any TP size): drop --tp, or "
                         "split it into files with --files N")
    if args.layers:  # config.json has no other depth to keep: a model of that many layers
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    if args.quant and args.layout not in ("hf", "chatglm2"):
        raise ValueError("--quant is for --layout hf and chatglm2 (as chatglm-6b-int4 and chatglm2-6b-int4); "
                         "quantize other layouts with glm-tp-quantize")
    if args.chat and (args.layout == "hf" or (args.layout == "glm-hf" and args.chat != "glm4")):
        raise ValueError("--chat is for --layout chatglm2 (glm-hf holds GLM-4's tokenizer, hf ChatGLM-6B's)")
    if args.layout == "hf" and config_model(hf_config(cfg), 0) != cfg:  # the loader must read back this model
        raise ValueError(f"the Hugging Face layout is ChatGLM-6B's (2D positions, GeLU MLP, untied LM head, its "
                         f"chat format and ids) and {args.preset} is not: use --preset tiny-chatglm or chatglm-6b, "
                         f"or --layout release")
    if args.layout != "hf" and not _chatglm2_architecture(cfg, args.layout == "glm-hf"):
        raise ValueError(f"--layout {args.layout} holds the ChatGLM2/3 and GLM-4 architecture (RMSNorm, SwiGLU, half "
                         f"rotary, causal, untied head{', KV groups, QKV bias only' if args.layout == 'glm-hf' else ''}) "
                         f"and {args.preset} is not it: use --preset tiny-chatglm2, chatglm2-6b or glm-4-9b")
    if not 1 <= (args.files or 1) <= len(full_shapes(cfg)):
        raise ValueError(f"--files must be between 1 and {len(full_shapes(cfg))} (the number of tensors)")
    return cfg


def _chatglm2_architecture(cfg: ModelConfig, grouped: bool) -> bool:
    """What ChatGLM2's config.json (grouped: GlmForCausalLM's, whose q/k/v are apart) can describe."""
    shape = (cfg.norm, cfg.mlp, cfg.position_encoding, cfg.causal, cfg.tied_lm_head) == \
        ("rmsnorm", "swiglu", "half", True, False)
    return shape and (not grouped or (cfg.kv_groups > 0 and cfg.bias == "qkv"))


def chat_of(args: argparse.Namespace, cfg: ModelConfig) -> str:
    """--chat, else the preset's chat format, else ChatGLM2's (glm-hf: GLM-4's)."""
    if args.layout == "glm-hf":
        return "glm4"
    return args.chat or (cfg.chat_template if cfg.chat_template in CHATS else "chatglm2")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layout", choices=("release", "hf", "chatglm2", "glm-hf"), default="release",
                    help="release: GLM-130B's shards; hf: a ChatGLM-6B clone; chatglm2: a ChatGLM2/3 or GLM-4 clone "
                         "(THUDM's files); glm-hf: transformers' GlmForCausalLM folder")
    ap.add_argument("--quant", choices=("int4", "int8"), help="hf, chatglm2: quantized linears, as the -int4 clones")
    ap.add_argument("--chat", choices=CHATS, help="chatglm2 layout: whose tokenizer files (default: the preset's)")
    ap.add_argument("--tp", type=int, default=1, help="shards of the release layout")
    ap.add_argument("--files", type=int, help="safetensors files of the Hugging Face layouts (default 1)")
    ap.add_argument("--layers", type=int, help="override the preset's layer count (same width)")
    ap.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iteration", default="1")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        cfg = model_for(args)
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        ap.error(str(e))
    dst = prepare_output(args.dst, args.force)
    if args.layout != "release":
        write_clone(dst, cfg, args, dtype)
        return
    tokenizer = bundled_tokenizer(cfg)
    write_random(dst, cfg, args.tp, dtype, args.seed, args.iteration)
    extra = {"tokenizer": tokenizer.name, "tokenizer_offset": 0} if tokenizer else {}
    if tokenizer:  # before write_latest, which records its size and SHA-256
        shutil.copy(tokenizer, dst / tokenizer.name)
    write_latest(dst, args.iteration, make_metadata(cfg, args.tp, dtype, seed=args.seed, **extra))
    print(f"wrote {dst}: {args.preset} ({cfg.num_layers} layers), tp={args.tp}, {args.dtype}, seed={args.seed}"
          f"{', with the demo tokenizer' if tokenizer else ''}")


def write_clone(dst: Path, cfg: ModelConfig, args: argparse.Namespace, dtype: torch.dtype) -> None:
    """A Hugging Face clone: its tokenizer files first, as they decide the ids config.json then names."""
    written = write_tokenizer_files(dst, cfg, args.layout, chat_of(args, cfg))
    if args.layout != "hf":
        cfg = with_clone_ids(cfg, dst, args.layout == "glm-hf")
    bits = parse_quant(args.quant) or 0
    write_random_hf(dst, cfg, dtype, args.seed, args.files or 1, NAMING[args.layout], bits)
    read = ModelConfig.from_dict(config_metadata(dst)["model"])  # what the loader will see
    print(f"wrote {dst}: {args.preset} ({cfg.num_layers} layers) as a {args.layout} clone, {args.files or 1} file(s), "
          f"{args.quant or args.dtype}, seed={args.seed}, chat format {read.chat_template or 'none'}"
          f"{', with ' + written if written else ', no tokenizer files'}")


def with_clone_ids(cfg: ModelConfig, dst: Path, prefer_json: bool) -> ModelConfig:
    """The model with the ids its tokenizer files give (GLM-4's end of text and pad are <|endoftext|>)."""
    facts = read_tokenizer(dst, cfg.vocab_size, prefer_json)
    probe = dataclasses.replace(cfg, chat_template=facts.template, stop_ids=())
    s = facts.specials
    eos = s["<|endoftext|>"] if facts.template == "glm4" else cfg.special.eos
    pad = eos if facts.template == "glm4" else cfg.special.pad
    special = dataclasses.replace(probe.special, eos=eos, pad=pad)
    sop, eop = ("<sop>", "<eop>") if facts.template == "glm4" else ("sop", "eop")
    special = dataclasses.replace(special, mask=s["[MASK]"], gmask=s["[gMASK]"], smask=s["[sMASK]"], sop=s[sop],
                                  eop=s[eop])
    return dataclasses.replace(probe, special=special, stop_ids=facts.stop_ids())


if __name__ == "__main__":
    main()
