#!/usr/bin/env bash
# torchrun without Accelerate's launcher (Accelerate still drives the training loop inside).
#   launch/torchrun.sh 8 recipes/hybrid_small_joint.yaml train.steps=100000
#   launch/torchrun.sh 2 recipes/quickstart.yaml        # on CPU: gloo is chosen automatically
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node.
set -euo pipefail
NPROC_PER_NODE=${1:?usage: launch/torchrun.sh NPROC_PER_NODE RECIPE [key=value ...]}
RECIPE=${2:?usage: launch/torchrun.sh NPROC_PER_NODE RECIPE [key=value ...]}
shift 2
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m ssl_hybrid pretrain -c "$RECIPE" "$@"
