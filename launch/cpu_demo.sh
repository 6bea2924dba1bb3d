#!/usr/bin/env bash
# The bundled demo model at TP=2 on CPU (gloo), filling the blanks of a few prompts piped into the TTY.
# Interactive instead: torchrun --standalone --nproc_per_node 2 -m glm_tp.generate
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_run.sh
PROMPTS="${PROMPTS:-launch/demo_prompts.txt}"
echo "+ prompts from $PROMPTS:" >&2
sed 's/^/    /' "$PROMPTS" >&2
run torchrun --standalone --nproc_per_node "${NPROC:-2}" -m glm_tp.generate input=interactive "$@" < "$PROMPTS"
