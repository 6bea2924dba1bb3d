#!/usr/bin/env bash
# GLM-130B on 8xRTX3090-int8: CHECKPOINT=/path/to/glm-130b-sat TOKENIZER=/path/to/icetk_models bash launch/8xRTX3090-int8.sh [key=value ...]
# The checkpoint must have 8 shards (tools/repartition.py reshards it; tools/quantize.py pre-quantizes it).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_run.sh
run torchrun --standalone --nproc_per_node 8 -m glm_tp.generate preset=glm-130b hardware=8xRTX3090-int8 \
  checkpoint="${CHECKPOINT:?set CHECKPOINT to the folder holding 'latest'}" \
  tokenizer="${TOKENIZER:?set TOKENIZER to the folder holding ice_text.model}" "$@"
