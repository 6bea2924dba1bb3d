"""Checkpoints that prove they are whole: each file's size and SHA-256, recorded when glm-tp writes a
checkpoint (`files` in glm_tp.json) and checked when it loads one.

Sizes are checked on every load (a stat per file); hashes on request (`verify=true`,
`tools/verify.py`), since they read every byte. A problem is one line naming the file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

CHUNK = 16 << 20


def sha256_file(path: Path, bar: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def file_records(root: Path, paths: Iterable[Path], progress: bool = False) -> dict[str, dict[str, int | str]]:
    """{path relative to root: {"size", "sha256"}} for the given files."""
    paths = list(paths)
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="checksums",
              disable=not progress, leave=False) as bar:
        return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p, bar)}
                for p in paths}


def size_problem(root: Path, rel: str, record: dict) -> str | None:
    """Why the file `rel` does not match its recorded size, or None."""
    path = root / rel
    if not path.is_file():
        return f"{path} is missing (glm_tp.json records it): re-copy it"
    size = path.stat().st_size
    if size != int(record["size"]):
        how = "truncated" if size < int(record["size"]) else "altered (longer than recorded)"
        return (f"{path} is {size} bytes but glm_tp.json records {record['size']}: it is {how}; "
                f"re-copy it (tools/verify.py checks the whole checkpoint)")
    return None


def hash_problems(root: Path, records: dict[str, dict], names: list[str], progress: bool = False) -> dict[str, str]:
    """{rel: problem} for the files among `names` whose SHA-256 differs from the record."""
    out = {}
    total = sum((root / n).stat().st_size for n in names if (root / n).is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying", disable=not progress) as bar:
        for rel in names:
            problem = size_problem(root, rel, records[rel])
            if problem is None and sha256_file(root / rel, bar) != records[rel]["sha256"]:
                problem = (f"{root / rel} does not match its recorded SHA-256: it is corrupt or from another "
                           f"checkpoint; re-copy it")
            if problem:
                out[rel] = problem
    return out
