"""What a ChatGLM2/3 or GLM-4 clone's tokenizer files say: which file is the tokenizer and of which kind, how many
text ids it has, the special tokens appended after them, and the chat format of the model.

- `tokenizer.model` is either a sentencepiece model (ChatGLM2/3: the specials follow its pieces) or GLM-4's
  tiktoken ranks (a text file, one base64 token and its rank per line: the specials follow its lines);
- `tokenizer.json` (transformers' GLM-4 files): a `tokenizers` BPE whose vocabulary holds the text ids, its
  `added_tokens` the specials;
- `tokenizer_config.json`'s `added_tokens_decoder` (GLM-4, later ChatGLM3 files) names specials by id.

The order of the appended specials is config.py's (CHATGLM2_SPECIALS, CHATGLM3_ROLES, GLM4_SPECIALS); ids the
files name override it.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm_tp.checkpoints.release import CheckpointError
from glm_tp.config import CHATGLM2_SPECIALS, CHATGLM3_ROLES, GLM4_SPECIALS

_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\r?$")
# the text ids of the released tokenizers, for a folder without its tokenizer files (ids then follow them)
RELEASED_TEXT_IDS = {"chatglm2": 64789, "chatglm3": 64789, "glm4": 151329}
GLM4_VOCAB = 151552  # GLM-4's padded vocabulary (ChatGLM2/3: 65024)
ROLE_STOPS = ("<|user|>", "<|observation|>")  # the turn after an answer begins with one: the answer has ended


@dataclass(frozen=True)
class TokenizerFacts:
    file: str | None      # the tokenizer's file in the folder, None when there is none
    kind: str             # "sentencepiece", "tiktoken" or "tokenizers"
    text_ids: int         # ids below this are text
    specials: dict[str, int]
    template: str         # the chat format: "chatglm2", "chatglm3" or "glm4"

    def metadata(self) -> dict[str, Any]:
        """The checkpoint metadata keys the tokenizer loader reads."""
        out: dict[str, Any] = {"tokenizer_kind": self.kind, "tokenizer_offset": 0, "tokenizer_specials": self.specials}
        return {"tokenizer": self.file, **out} if self.file else out

    def stop_ids(self) -> tuple[int, ...]:
        """ChatGLM3's and GLM-4's chat formats end an answer at the next role token."""
        if self.template == "chatglm2":
            return ()
        return tuple(self.specials[n] for n in ROLE_STOPS if n in self.specials)


def appended(template: str) -> tuple[str, ...]:
    """The specials that follow the text ids, in order."""
    if template == "glm4":
        return GLM4_SPECIALS
    return CHATGLM2_SPECIALS + (CHATGLM3_ROLES if template == "chatglm3" else ())


def read_tokenizer(root: Path, vocab_size: int, prefer_json: bool = False) -> TokenizerFacts:
    """The tokenizer facts of the clone at `root` (a model of `vocab_size` embedding rows). prefer_json:
    transformers' layout, whose tokenizer is tokenizer.json (and whose models are GLM-4's)."""
    order = ("tokenizer.json", "tokenizer.model") if prefer_json else ("tokenizer.model", "tokenizer.json")
    file = next((name for name in order if (root / name).is_file()), None)
    kind, text_ids, added = "sentencepiece", None, _config_added(root)
    if file == "tokenizer.json":
        kind, text_ids, from_json = "tokenizers", *_tokenizers_json(root / file)
        added = {**from_json, **added}
    elif file == "tokenizer.model":
        lines = _tiktoken_lines(root / file)
        kind, text_ids = ("tiktoken", lines) if lines is not None else ("sentencepiece", _pieces(root / file))
    template = _template(root, kind, file, added, vocab_size, "glm4" if prefer_json else "chatglm2")
    names = appended(template)
    if text_ids is None:  # no tokenizer: the released one's text ids, or (a smaller model) the top of the vocabulary
        released = RELEASED_TEXT_IDS[template]
        text_ids = released if released + len(names) <= vocab_size else vocab_size - len(names)
    specials = {name: text_ids + i for i, name in enumerate(names)}
    specials.update({name: i for name, i in added.items() if i >= text_ids})  # the files' own word wins
    return TokenizerFacts(file, kind, text_ids, specials, template)


def _template(root: Path, kind: str, file: str | None, added: dict[str, int], vocab_size: int, default: str) -> str:
    """The chat format, from the files: GLM-4 ships a BPE tokenizer (tiktoken ranks or tokenizer.json) with
    `<sop>`-style specials and a 151552-row vocabulary; ChatGLM2 and ChatGLM3 share a sentencepiece model, and
    ChatGLM3's files name its role tokens (tokenizer_config.json's added tokens or chat template, its
    tokenization_chatglm.py), ChatGLM2's do not. No tokenizer file and nothing named: the vocabulary's size,
    else `default` (the layout's family)."""
    if kind != "sentencepiece" or "<sop>" in added:
        return "glm4"
    texts = [_text(root / name) for name in ("tokenizer_config.json", "tokenization_chatglm.py")]
    if any(role in added or any(role in t for t in texts) for role in CHATGLM3_ROLES):
        return "chatglm3"
    if file is None:
        return "glm4" if vocab_size == GLM4_VOCAB else default
    return "chatglm2"


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        return ""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-copy it") from None


def _config_added(root: Path) -> dict[str, int]:
    """tokenizer_config.json's added_tokens_decoder: {id: {"content": token}} -> {token: id}."""
    path = root / "tokenizer_config.json"
    conf = _json(path) if path.is_file() else None
    decoder = conf.get("added_tokens_decoder") if isinstance(conf, dict) else None
    if not isinstance(decoder, dict):
        return {}
    try:
        return {entry["content"]: int(i) for i, entry in decoder.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: added_tokens_decoder is not {{id: {{\"content\": token}}}} ({e}): re-copy it") from None


def _tokenizers_json(path: Path) -> tuple[int, dict[str, int]]:
    """tokenizer.json's text ids (its model's vocabulary) and added tokens."""
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path} has no model: not a tokenizers file (re-copy it)")
    vocab = data["model"].get("vocab")
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or [] if "content" in t and "id" in t}
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"{path} has no model vocabulary: not a tokenizers BPE file (re-copy it)")
    special_ids = set(added.values())
    text = [i for i in vocab.values() if i not in special_ids]  # some files list the specials in both
    return max(text) + 1, added


def _tiktoken_lines(path: Path) -> int | None:
    """The ranks in a tiktoken file (GLM-4's tokenizer.model), or None when the file is not one."""
    with path.open("rb") as f:
        first = f.readline(4096)
        if not _RANK_LINE.match(first.rstrip(b"\n")):
            return None
        return 1 + sum(1 for line in f if line.strip())


def _pieces(path: Path) -> int:
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is neither a sentencepiece model nor tiktoken ranks ({str(e).strip()[:80]}): "
                              f"re-copy it") from None


# --- the files of a clone, for a small model (glm-tp-make-checkpoint) ---

BYTE_TOKENS = 256  # a byte-level BPE with no merges: one token per byte


def write_sentencepiece_files(dst: Path, model_file: Path, template: str) -> None:
    """ChatGLM2/3's: the sentencepiece model as tokenizer.model; ChatGLM3's tokenizer_config.json names its roles."""
    shutil.copy(model_file, dst / "tokenizer.model")
    conf: dict[str, Any] = {"tokenizer_class": "ChatGLMTokenizer"}
    if template == "chatglm3":
        first = _pieces(dst / "tokenizer.model") + len(CHATGLM2_SPECIALS)
        conf["added_tokens_decoder"] = _decoder(CHATGLM3_ROLES, first)
    (dst / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def write_bpe_files(dst: Path, kind: str) -> None:
    """GLM-4's: a byte-level BPE as tiktoken ranks (tokenizer.model) or a tokenizers file (tokenizer.json), its
    specials after the bytes, named in tokenizer_config.json too."""
    if kind == "tiktoken":
        lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(BYTE_TOKENS)]
        (dst / "tokenizer.model").write_text("\n".join(lines) + "\n")
    else:
        (dst / "tokenizer.json").write_text(json.dumps(_tokenizers_file(), ensure_ascii=False, indent=1) + "\n")
    conf = {"tokenizer_class": "PreTrainedTokenizerFast" if kind == "tokenizers" else "ChatGLM4Tokenizer",
            "added_tokens_decoder": _decoder(GLM4_SPECIALS, BYTE_TOKENS)}
    (dst / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


def write_released_names(dst: Path, template: str) -> None:
    """For a model of the released size without its tokenizer: a tokenizer_config.json naming the specials at the
    released tokenizer's ids (ChatGLM3's roles, GLM-4's all), so the chat format is known; ChatGLM2 needs none."""
    if template == "chatglm2":
        return
    names = CHATGLM3_ROLES if template == "chatglm3" else GLM4_SPECIALS
    first = RELEASED_TEXT_IDS[template] + (len(CHATGLM2_SPECIALS) if template == "chatglm3" else 0)
    (dst / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": _decoder(names, first)}, indent=2)
                                               + "\n")


def _decoder(names: tuple[str, ...], first: int) -> dict[str, dict[str, Any]]:
    return {str(first + i): {"content": name, "special": True} for i, name in enumerate(names)}


def _byte_chars() -> list[str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes are themselves, the others
    take the code points from 256 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def _tokenizers_file() -> dict[str, Any]:
    added = [{"id": BYTE_TOKENS + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, name in enumerate(GLM4_SPECIALS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {c: i for i, c in enumerate(_byte_chars())}, "merges": []}}
