"""Shared bits of the command-line tools: making `glm_tp` importable from a source checkout and
refusing to overwrite a non-empty output folder."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prepare_output(dst: str | Path, force: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not force:
        sys.exit(f"error: output folder {dst} is not empty: choose another folder or pass --force to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    return dst
