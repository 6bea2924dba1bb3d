#!/usr/bin/env bash
# The bundled demo model at TP=2 on CPU (gloo), filling the blanks of a few prompts piped into the TTY.
# The demo ships as one shard; it is resharded once into runs/ for the number of ranks asked for.
# Interactive instead: torchrun --standalone --nproc_per_node 2 -m glm_tp.generate checkpoint=runs/demo-tp2
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_run.sh
NPROC="${NPROC:-2}"
CKPT="runs/demo-tp$NPROC"
if [ ! -f "$CKPT/latest" ]; then
  echo "+ python tools/repartition.py glm_tp/demo $CKPT --tp $NPROC" >&2
  python tools/repartition.py glm_tp/demo "$CKPT" --tp "$NPROC" --force >&2
fi
PROMPTS="${PROMPTS:-launch/demo_prompts.txt}"
echo "+ prompts from $PROMPTS:" >&2
sed 's/^/    /' "$PROMPTS" >&2
run torchrun --standalone --nproc_per_node "$NPROC" -m glm_tp.generate checkpoint="$CKPT" input=interactive "$@" \
  < "$PROMPTS"
