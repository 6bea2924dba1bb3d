"""The command-line tools' output: the output folder (refused when it already holds something, unless --force)
and warnings as one plain line each."""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm


def prepare_output(dst: str | Path, force: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not force:
        sys.exit(f"error: output folder {dst} is not empty: choose another folder or pass --force to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def _one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              file: TextIO | None = None, line: str | None = None) -> None:
    tqdm.write(f"warning: {message}", file=file or sys.stderr)  # tqdm.write: not into a progress bar's line


@contextmanager
def plain_warnings() -> Iterator[None]:
    """Within it, a warning is the line `warning: <message>` on stderr: Python's own format adds the file, line
    number and source line of the warn() call, which tell the user of a command nothing."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line
        yield
