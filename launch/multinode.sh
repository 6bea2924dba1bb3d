#!/usr/bin/env bash
# Two (or more) nodes of 8 GPUs under one torchrun rendezvous: tensor parallel inside each node, one pipeline
# stage per node. Run on every node with the same RDZV (host:port of node 0) and JOB_ID:
#   NNODES=2 RDZV=node0.example:29500 CHECKPOINT=... TOKENIZER=... bash launch/multinode.sh [key=value ...]
# torchrun gives each node a contiguous block of ranks, so with pipeline_parallel=NNODES a stage's TP all-reduces
# stay on the node's NVLink and one activation per step crosses the network. Each stage loads only its layers,
# from any checkpoint layout. Only world rank 0 reads input and writes output; a GLM-130B fp16 run on
# 2 x 8 x 24 GB is `hardware=2x8xRTX3090-fp16`.
# Across nodes NCCL and gloo need to know which network to use: NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (the
# interface the nodes reach each other on, e.g. eth0), on InfiniBand NCCL_IB_HCA (e.g. mlx5), and without it
# NCCL_IB_DISABLE=1; NCCL_DEBUG=WARN names a failing link.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_run.sh
NNODES="${NNODES:?number of nodes}"
run torchrun --nnodes "$NNODES" --nproc_per_node "${NPROC:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "${RDZV:?host:port of node 0}" --rdzv-id "${JOB_ID:-glm-tp}" \
  -m glm_tp.generate preset=glm-130b device=cuda pipeline_parallel="$NNODES" \
  checkpoint="${CHECKPOINT:?}" tokenizer="${TOKENIZER:?}" "$@"
