#!/usr/bin/env bash
# tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]
# GPUS (default 8), GPUS_PER_NODE (8; 0 for CPU processes), CPUS_PER_TASK (5; 1 on CPUs), SRUN_ARGS.
USAGE="slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [options]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[[ -n "${1:-}" && -n "${2:-}" && -n "${4:-}" ]] || die "missing arguments (usage: $USAGE)"
check_config "$3"
srun_ "$1" "$2" test.py "$3" "$4" "${@:5}"
