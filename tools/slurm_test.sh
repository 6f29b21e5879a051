#!/usr/bin/env bash
# tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]
# GPUS (default 8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS as in mmdet.
set -x
USAGE="slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [options]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
PARTITION=${1:-}
JOB_NAME=${2:-}
CONFIG=${3:-}
CHECKPOINT=${4:-}
[[ -n "$PARTITION" && -n "$JOB_NAME" && -n "$CHECKPOINT" ]] || die "missing arguments (usage: $USAGE)"
check_config "$CONFIG"
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
check_count GPUS "$GPUS"

srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$PYTHON" -u "$REPO/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher slurm "${@:5}"
