#!/usr/bin/env bash
# Wheels of the dependencies a CUDA PyTorch image lacks, for tools/gpu_check.py to install there offline.
# Run from anywhere on a machine that reaches PyPI (any OS, any Python):
#   bash tools/gpu_wheels.sh                # -> gpu-wheels/ at the checkout's root
#   GPU_PYTHON=3.11 bash tools/gpu_wheels.sh  # for an image with another Python
# The list comes from tools/gpu_check.py (REQUIREMENTS), so the two cannot disagree. torch and numpy are
# never fetched: the image has them, and a second copy would be hundreds of MB. numba is left out too:
# only the CPU kernels use it, and its llvmlite wheel alone is ~57 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-wheels
PY_VERSION=${GPU_PYTHON:-3.12}
ABI=cp${PY_VERSION/./}
LIMIT_MIB=60
PYTHON=$(command -v python3 || command -v python)

mapfile -t REQS < <("$PYTHON" tools/gpu_check.py --requirements)
[ "${#REQS[@]}" -gt 0 ] || { echo "error: tools/gpu_check.py --requirements listed nothing" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT"

# omegaconf pins antlr4-python3-runtime 4.9.*, which PyPI has as a source archive only: build its wheel
# here (pure Python, so it installs anywhere), and let the download below find it in the same folder
"$PYTHON" -m pip wheel -q --no-deps -w "$OUT" "antlr4-python3-runtime==4.9.*"

# the GPU machine's Python and platform, not this one's; --only-binary: nothing is built there
"$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --abi "$ABI" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --find-links "$OUT" -d "$OUT" "${REQS[@]}"

ls "$OUT"
size_kib=$(du -sk "$OUT" | cut -f1)
echo "$OUT/: $(ls "$OUT" | wc -l) wheels, $((size_kib / 1024)) MiB (${size_kib} KiB)"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "error: $OUT/ is over ${LIMIT_MIB} MiB: it must travel with the checkout" >&2
    exit 1
fi
