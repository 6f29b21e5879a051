#!/usr/bin/env bash
# tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT. Without GPUs it runs GPUS CPU processes (gloo).
USAGE="dist_test.sh CONFIG CHECKPOINT GPUS [options]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CONFIG=${1:-}
CHECKPOINT=${2:-}
GPUS=${3:-}
check_config "$CONFIG"
[[ -n "$CHECKPOINT" ]] || die "missing CHECKPOINT (usage: $USAGE)"
check_count GPUS "$GPUS"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$REPO/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
