#!/usr/bin/env bash
# tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT. Without GPUs it runs GPUS CPU processes (gloo).
USAGE="dist_test.sh CONFIG CHECKPOINT GPUS [options]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
check_config "${1:-}"
[[ -n "${2:-}" ]] || die "missing CHECKPOINT (usage: $USAGE)"
check_count GPUS "${3:-}"
torchrun_ "$3" test.py "$1" "$2" "${@:4}"
