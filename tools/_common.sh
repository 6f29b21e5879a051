# Sourced by the launch scripts: the interpreter (this repo's .venv if there is one, else $PYTHON or
# python), argument checks that fail early with one line, and the two ways of starting processes.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
check_config() { [[ -f "$1" ]] || die "config file not found: ${1:-<missing>} (usage: $USAGE)"; }
check_count() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '${2:-}' (usage: $USAGE)"
}

# torchrun_ NPROC SCRIPT ARGS...: NPROC processes on this node (NNODES, NODE_RANK, MASTER_ADDR, PORT
# as in mmdet), each running tools/SCRIPT ARGS --launcher pytorch.
torchrun_() {
    local nproc=$1 script=$2
    shift 2
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --nproc_per_node="$nproc" \
        --master_port="${PORT:-29500}" \
        "$REPO/tools/$script" "$@" --launcher pytorch
}

# srun_ PARTITION JOB_NAME SCRIPT ARGS...: GPUS tasks through slurm (GPUS, GPUS_PER_NODE,
# CPUS_PER_TASK, SRUN_ARGS as in mmdet), each running tools/SCRIPT ARGS --launcher slurm.
srun_() {
    local partition=$1 job_name=$2 script=$3
    shift 3
    local gpus=${GPUS:-8} gpus_per_node=${GPUS_PER_NODE:-8}
    check_count GPUS "$gpus"
    set -x
    # shellcheck disable=SC2086  # SRUN_ARGS holds several options
    exec srun -p "$partition" \
        --job-name="$job_name" \
        --gres=gpu:"$gpus_per_node" \
        --ntasks="$gpus" \
        --ntasks-per-node="$gpus_per_node" \
        --cpus-per-task="${CPUS_PER_TASK:-5}" \
        --kill-on-bad-exit=1 \
        ${SRUN_ARGS:-} \
        "$PYTHON" -u "$REPO/tools/$script" "$@" --launcher slurm
}
