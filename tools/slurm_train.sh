#!/usr/bin/env bash
# tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py options]
# GPUS (default 8), GPUS_PER_NODE (8; 0 for CPU processes), CPUS_PER_TASK (5; 1 on CPUs), SRUN_ARGS.
USAGE="slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [options]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[[ -n "${1:-}" && -n "${2:-}" && -n "${4:-}" ]] || die "missing arguments (usage: $USAGE)"
check_config "$3"
srun_ "$1" "$2" train.py "$3" --work-dir="$4" "${@:5}"
