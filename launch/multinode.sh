#!/usr/bin/env bash
# Two (or more) nodes of 8 GPUs under one torchrun rendezvous. Run on every node with the same MASTER:
#   NNODES=2 NODE_RANK=0 MASTER=node0.example:29500 CHECKPOINT=... TOKENIZER=... bash launch/multinode.sh
# The tensor-parallel group spans all NNODES*8 ranks, so the checkpoint needs that many shards
# (python tools/repartition.py SRC DST --tp 16). Only rank 0 (on NODE_RANK 0) reads input and writes output.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_run.sh
run torchrun --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${NPROC:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER:?host:port of node 0}" --rdzv_id "${JOB_ID:-glm-tp}" \
  -m glm_tp.generate preset=glm-130b device=cuda checkpoint="${CHECKPOINT:?}" tokenizer="${TOKENIZER:?}" "$@"
