"""Check that a checkpoint is whole before you load it (any layout glm-tp reads).

    glm-tp-verify CKPT              # sizes and SHA-256 against glm_tp.json; every tensor readable
    glm-tp-verify CKPT --record     # a checkpoint without checksums (the GLM-130B release, a
                                    # Hugging Face folder): record them now, from a copy you trust
    glm-tp-verify CKPT --stage 1    # written per pipeline stage: only that stage's files (a node's copy)

Without recorded checksums it still opens every file and reads every tensor's last element, which finds
truncated and unreadable files. Exit status 1 and one line per bad file when anything is wrong.
"""
from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from glm_tp.checkpoints.integrity import file_records
from glm_tp.checkpoints.release import (
    METADATA_FILE,
    CheckpointError,
    check_files,
    recorded_stages,
    stage_folder,
)
from glm_tp.checkpoints.sources import HF_INDEXES, open_source


def read_every_tensor(source) -> list[str]:
    """Touch the last element of every tensor (a cut file fails here), with a progress bar."""
    problems = []
    for name in tqdm(source.names(), desc="reading tensors", unit="tensor"):
        for part in source.parts(name):
            try:
                if part.shape and part.shape[0]:
                    part.narrow(0, part.shape[0] - 1, 1).sum()
            except Exception as e:  # noqa: BLE001 - any failure to read means a bad file
                problems.append(f"{source.file_of(name)}: tensor {name} cannot be read ({type(e).__name__}): "
                                f"the file is truncated or corrupt; re-copy it")
                break
    return problems


def record(source) -> None:
    meta_path = source.root / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    extras = [source.root / n for n in ("config.json", "tokenizer_config.json", "ice_text.model", *HF_INDEXES)]
    meta["files"] = file_records(source.root, source.files + [p for p in extras if p.is_file()], progress=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"recorded {len(meta['files'])} file(s) in {meta_path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--record", action="store_true", help="write the files' sizes and SHA-256 into glm_tp.json")
    ap.add_argument("--stage", type=int,
                    help="of a checkpoint written per pipeline stage: check that stage's files only")
    args = ap.parse_args(argv)
    if args.record and args.stage is not None:
        ap.error("--record records every file: give it without --stage")
    try:
        source = open_source(args.checkpoint, args.stage)
        if args.stage is not None and recorded_stages(source.metadata) is None:
            raise CheckpointError(f"--stage {args.stage}: {args.checkpoint} is not written per pipeline stage; "
                                  f"check it without --stage")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.record:
        record(source)
        return 0
    recorded = bool((source.metadata or {}).get("files"))
    problems: list[str] = []
    folder = None if args.stage is None else f"{source.iteration}/{stage_folder(args.stage)}"
    for check in (lambda: list(check_files(source.root, source.metadata, verify=recorded, progress=True,
                                           stage=folder).values()),
                  lambda: read_every_tensor(source)):
        try:
            problems += check()
        except CheckpointError as e:
            problems.append(str(e))
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return 1
    how = "sizes and SHA-256 match glm_tp.json" if recorded else "no recorded checksums (use --record)"
    print(f"{args.checkpoint}: {source.layout_name}, {len(source.names())} tensors readable; {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
