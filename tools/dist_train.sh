#!/usr/bin/env bash
# tools/dist_train.sh CONFIG GPUS [train.py options]
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT. Without GPUs it runs GPUS CPU processes (gloo).
USAGE="dist_train.sh CONFIG GPUS [options]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
check_config "${1:-}"
check_count GPUS "${2:-}"
torchrun_ "$2" train.py "$1" "${@:3}"
