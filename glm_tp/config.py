"""Model shapes and their presets, and the run options every layer checks the same way.

One dataclass describes a GLM-130B-family transformer; `PRESETS` names the shapes people use.
Tensor-parallel validity lives here too, because it depends only on the shape. The option choices
(dtypes, kernels, LM heads, quantization) and their checks sit here, at the bottom of the package, so
the loader, the layers, the kernels and the settings check share one rule and one message.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# how quantized matmuls are computed (kernels/quant.py): the fastest fused kernel (on CPU: Q8_0 activations
# for decode batches where the native kernel runs), the same with weight-only numerics throughout, CPU
# integer kernels with Q8_0 activations for larger batches too, torch's fused kernels only, or the
# reference's dequantize + matmul
KERNELS = ("fused", "weight-only", "q8", "torch", "dequant")
CPU_KERNELS = ("fused", "weight-only", "q8")  # the settings that use glm-tp's own CPU kernels
LM_HEADS = ("model", "int8")  # the LM head in the model's dtype, or an INT8 copy of it
# quant= values -> weight bits: None = whatever the checkpoint holds, 0 = float, 8/4 = INT8/INT4 weight-only
QUANT_CHOICES = {None: None, "auto": None, "none": 0, "fp": 0, "fp16": 0, "bf16": 0, "int8": 8, "int4": 4,
                 8: 8, 4: 4, 0: 0}


def check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    """One message for every option with a fixed set of values."""
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}: use one of {', '.join(allowed)}")


def check_kernels(kernels: str) -> None:
    check_choice("kernels", kernels, KERNELS)


def check_lm_head(lm_head: str) -> None:
    check_choice("lm_head", lm_head, LM_HEADS)


def parse_quant(quant: str | int | None) -> int | None:
    """None = whatever the checkpoint holds; 0 = float; 8/4 = INT8/INT4 weight-only."""
    key = quant.lower() if isinstance(quant, str) else quant
    if key not in QUANT_CHOICES:
        raise ValueError(f"unknown quantization {quant!r}: use none, int8 or int4")
    return QUANT_CHOICES[key]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The model dtype when none is asked for: fp16 on CUDA (the release's), fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# chat formats (text/chat.py): ChatGLM-6B's rounds, ChatGLM2's rounds, ChatGLM3's and GLM-4's role tokens
CHAT_TEMPLATES = ("", "chatglm", "chatglm2", "chatglm3", "glm4")
# the special tokens ChatGLM2/3 append after their sentencepiece pieces, in order (ChatGLM3 adds the roles),
# and those GLM-4 puts after its 151329 BPE ranks: the one home of their order, read by checkpoints/hf.py
# (the model's SpecialTokens) and text/ (the tokenizer's names)
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of GLM's control tokens. The GLM-130B tokenizer's values are the defaults."""

    mask: int = 150000   # [MASK]: short blank, generated positions pinned to the mask
    gmask: int = 150001  # [gMASK]: long blank to the end, positions keep counting
    smask: int = 150002  # [sMASK]: handled like [MASK]
    sop: int = 150004    # start of a generated piece; first causal position
    eop: int = 150005    # end of a generated piece
    eos: int = 20002     # end of text; appended when a prompt does not end with a mask
    pad: int = 0


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    inner_hidden_size: int  # GeGLU inner width; h->4h outputs twice this (value rows, then gate rows)
    vocab_size: int         # embedding rows (padded)
    max_seq_len: int = 2048
    layernorm_eps: float = 1e-5
    rotary_base: float = 10000.0
    special: SpecialTokens = field(default_factory=SpecialTokens)
    deepnorm_layers: int = 0  # depth the model was trained at, for alpha (0: num_layers); see with_layers
    # the GLM family's variants (ChatGLM-6B: "2d", "gelu", untied, "chatglm"; ChatGLM2/3 and GLM-4: "half",
    # "swiglu", untied, "rmsnorm", kv_groups 2, bias "qkv")
    position_encoding: str = "1d"  # "1d": one rotary over the head; "2d": position and block position, half each;
    #                                "half": 1D, rotary on the first half of the head in interleaved pairs
    mlp: str = "geglu"             # "geglu" (h->4h = value and gate rows), "gelu" (tanh GeLU, no gate) or
    #                                "swiglu" (h->4h = gate and up rows: silu(gate) * up)
    tied_lm_head: bool = True      # False: a separate vocab-parallel lm_head.weight
    norm: str = "deepnorm"         # "deepnorm": post-LN LayerNorm with alpha; "rmsnorm": pre-LN RMSNorm
    kv_groups: int = 0             # grouped-query attention's KV heads (multi_query_group_num); 0: one per head
    bias: str = "all"              # which linears have a bias: "all", or "qkv" (the QKV projection only)
    chat_template: str = ""        # how chat messages become a prompt (CHAT_TEMPLATES; "": no chat format)
    causal: bool = False           # ChatGLM2/3, GLM-4: causal attention over the whole sequence, prompts begin
    #                                [gMASK] sop, no blanks (a [MASK] in a prompt is an error)
    stop_ids: tuple[int, ...] = () # ids besides eos/eop that end an answer (GLM-4: <|user|>, <|observation|>)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def glu(self) -> bool:
        """Whether h->4h holds two halves (GeGLU, SwiGLU), cut as partition's GLU layout."""
        return self.mlp in ("geglu", "swiglu")

    @property
    def kv_heads(self) -> int:
        return self.kv_groups or self.num_heads

    def kv_heads_per_rank(self, tp: int) -> int:
        """The KV heads one rank holds (and caches): its share, or the one group its heads use when tp
        exceeds the groups (see partition.GroupedQKV)."""
        return max(1, self.kv_heads // tp)

    @property
    def deepnorm_alpha(self) -> float:
        return (2.0 * (self.deepnorm_layers or self.num_layers)) ** 0.5

    def __post_init__(self) -> None:
        # whatever file a shape comes from (glm_tp.json, a clone's config.json), its bounds are checked here
        for key in ("num_layers", "hidden_size", "num_heads", "inner_hidden_size", "vocab_size", "max_seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "max_seq_len" else 1):
                raise ValueError(f"model {key} {value!r} must be a whole number >= {2 if key == 'max_seq_len' else 1}")
        for key in ("layernorm_eps", "rotary_base"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"model {key} {value!r} must be a finite number > 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for key, value, allowed in (("position_encoding", self.position_encoding, ("1d", "2d", "half")),
                                    ("mlp", self.mlp, ("geglu", "gelu", "swiglu")), ("norm", self.norm, ("deepnorm", "rmsnorm")),
                                    ("bias", self.bias, ("all", "qkv")), ("chat_template", self.chat_template, CHAT_TEMPLATES)):
            if value not in allowed:
                raise ValueError(f"model {key} {value!r} is not one of {', '.join(map(repr, allowed))}")
        if self.position_encoding in ("2d", "half") and self.head_dim % 4:
            raise ValueError(f"{self.position_encoding} rotary needs a head dim divisible by 4, not {self.head_dim}")
        if self.kv_groups < 0 or self.num_heads % self.kv_heads:
            raise ValueError(f"kv_groups {self.kv_groups} does not divide num_heads {self.num_heads}")

    def valid_tp_sizes(self, limit: int = 64) -> list[int]:
        """Sizes that divide every cut dimension; with KV groups, tp must also divide them or be a multiple
        of them, so that each rank's heads use whole groups."""
        dims = (self.num_heads, self.hidden_size, self.inner_hidden_size, self.vocab_size)
        g = self.kv_heads
        return [n for n in range(1, limit + 1) if all(d % n == 0 for d in dims) and (g % n == 0 or n % g == 0)]

    def check_tp(self, tp: int) -> None:
        if tp not in self.valid_tp_sizes(max(64, tp)):
            raise ValueError(
                f"tensor-parallel size {tp} does not divide this model (heads {self.num_heads}, KV groups "
                f"{self.kv_heads}, hidden {self.hidden_size}, inner {self.inner_hidden_size}, vocab {self.vocab_size}); "
                f"valid sizes: {', '.join(map(str, self.valid_tp_sizes()))}"
            )

    def with_layers(self, num_layers: int) -> "ModelConfig":
        """The first `num_layers` layers of this model: alpha stays the full model's, so each kept layer
        computes what it computes in the full model."""
        return dataclasses.replace(self, num_layers=num_layers, deepnorm_layers=self.deepnorm_layers or self.num_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        special = SpecialTokens(**d.pop("special", {}))
        d["stop_ids"] = tuple(int(i) for i in d.get("stop_ids", ()))  # JSON lists come back as lists
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(special=special, **{k: v for k, v in d.items() if k in known})


_TINY_SPECIAL = SpecialTokens(mask=1000, gmask=1001, smask=1002, sop=1004, eop=1005, eos=2, pad=0)

_CHATGLM2_SHAPE = dict(num_layers=28, hidden_size=4096, num_heads=32, inner_hidden_size=13696, vocab_size=65024,
                       max_seq_len=32768, special=SpecialTokens(mask=64789, gmask=64790, smask=64791, sop=64792,
                                                                eop=64793, eos=2, pad=0),
                       position_encoding="half", mlp="swiglu", tied_lm_head=False, norm="rmsnorm", kv_groups=2,
                       bias="qkv", causal=True)

PRESETS: dict[str, ModelConfig] = {
    "glm-130b": ModelConfig(num_layers=70, hidden_size=12288, num_heads=96, inner_hidden_size=32768,
                            vocab_size=150528, max_seq_len=2048),
    # THUDM/chatglm-6b (and -int4) as released: config.json's shape and ids, 2D positions, GeLU, untied head
    "chatglm-6b": ModelConfig(num_layers=28, hidden_size=4096, num_heads=32, inner_hidden_size=16384,
                              vocab_size=130528, max_seq_len=2048, special=SpecialTokens(
                                  mask=130000, gmask=130001, smask=130002, sop=130004, eop=130005, eos=2, pad=3),
                              position_encoding="2d", mlp="gelu", tied_lm_head=False, chat_template="chatglm"),
    # THUDM/chatglm2-6b, chatglm3-6b and glm-4-9b(-chat) as their config.json describe them (a clone's own
    # config.json is read without a preset: checkpoints/hf.py); specials appended after the text vocabulary
    "chatglm2-6b": ModelConfig(**_CHATGLM2_SHAPE, chat_template="chatglm2"),
    "chatglm3-6b": ModelConfig(**_CHATGLM2_SHAPE, chat_template="chatglm3", stop_ids=(64795, 64797)),
    "glm-4-9b": ModelConfig(num_layers=40, hidden_size=4096, num_heads=32, inner_hidden_size=13696, vocab_size=151552,
                            max_seq_len=131072, layernorm_eps=1.5625e-07, rotary_base=10000.0 * 500, special=SpecialTokens(
                                mask=151330, gmask=151331, smask=151332, sop=151333, eop=151334, eos=151329, pad=151329),
                            position_encoding="half", mlp="swiglu", tied_lm_head=False, norm="rmsnorm", kv_groups=2,
                            bias="qkv", causal=True, chat_template="glm4", stop_ids=(151336, 151338)),
    # the bundled demo model (glm_tp/demo, tools/train_demo.py); its glm_tp.json says the same
    "demo": ModelConfig(num_layers=4, hidden_size=192, num_heads=8, inner_hidden_size=384, vocab_size=128,
                        max_seq_len=96, special=SpecialTokens(mask=104, gmask=105, smask=106, sop=108, eop=109,
                                                              eos=2, pad=0)),
    # a few-MB model for unit tests: every dimension divisible by 1, 2, 4 and 8
    "tiny": ModelConfig(num_layers=2, hidden_size=64, num_heads=8, inner_hidden_size=128,
                        vocab_size=1024, max_seq_len=128, special=_TINY_SPECIAL),
    # the same size in ChatGLM-6B's architecture, for tests of that family
    "tiny-chatglm": ModelConfig(num_layers=2, hidden_size=64, num_heads=8, inner_hidden_size=256,
                                vocab_size=1024, max_seq_len=128, special=_TINY_SPECIAL, position_encoding="2d",
                                mlp="gelu", tied_lm_head=False, chat_template="chatglm"),
    # a small ChatGLM2/3 and GLM-4 architecture: 8 heads in 2 KV groups (TP 4 and 8 replicate KV heads)
    "tiny-chatglm2": ModelConfig(num_layers=3, hidden_size=128, num_heads=8, inner_hidden_size=192,
                                 vocab_size=1024, max_seq_len=128, special=_TINY_SPECIAL, position_encoding="half",
                                 mlp="swiglu", tied_lm_head=False, norm="rmsnorm", kv_groups=2, bias="qkv",
                                 causal=True),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)} or give a custom shape")
    return PRESETS[name]
