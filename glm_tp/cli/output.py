"""The command-line tools' output folder: refused when it already holds something, unless --force."""
from __future__ import annotations

import sys
from pathlib import Path


def prepare_output(dst: str | Path, force: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not force:
        sys.exit(f"error: output folder {dst} is not empty: choose another folder or pass --force to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    return dst
