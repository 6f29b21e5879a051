# Sourced by the launch scripts: the interpreter (this repo's .venv if there is one, else $PYTHON or
# python), argument checks that fail early with one line, and the two ways of starting processes.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
check_config() { [[ -f "$1" ]] || die "config file not found: ${1:-<missing>} (usage: $USAGE)"; }
# check_count NAME VALUE [MIN]: VALUE is a whole number, at least MIN (1 unless given)
check_count() {
    local min=${3:-1} what="a positive integer"
    (( min == 0 )) && what="a whole number"
    [[ "$2" =~ ^[0-9]+$ ]] && (( 10#$2 >= min )) || die "$1 must be $what, got '${2:-}' (usage: $USAGE)"
}

# torchrun_ NPROC SCRIPT ARGS...: NPROC processes on this node (NNODES, NODE_RANK, MASTER_ADDR, PORT
# as in mmdet), each running tools/SCRIPT ARGS --launcher pytorch; exits with torchrun's status.
#
# MAX_RESTARTS=N: when a process fails, torchrun starts them all again, up to N times (train.py then
# resumes from the last complete checkpoint).
# SIGTERM (pre-emption, kill) is passed to the processes alone: training ones finish the iteration,
# save and exit 0, and so does torchrun. Were torchrun to take SIGTERM itself, it would kill them
# after 30 s and exit 1; so it starts with SIGTERM ignored, and the tools take it back (run_tool).
torchrun_() {
    local nproc=$1 script=$2
    shift 2
    check_count MAX_RESTARTS "${MAX_RESTARTS:-0}" 0
    (
        trap '' TERM
        PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT exec "$PYTHON" -m torch.distributed.run \
            --nnodes="${NNODES:-1}" \
            --node_rank="${NODE_RANK:-0}" \
            --master_addr="${MASTER_ADDR:-127.0.0.1}" \
            --nproc_per_node="$nproc" \
            --master_port="${PORT:-29500}" \
            --max_restarts="${MAX_RESTARTS:-0}" \
            "$REPO/tools/$script" "$@" --launcher pytorch
    ) &
    TORCHRUN_PID=$!
    trap 'TERMINATED=1; kill -TERM $(cat /proc/"$TORCHRUN_PID"/task/*/children 2>/dev/null) 2>/dev/null' TERM
    trap '' INT  # Ctrl-C reaches torchrun directly; wait for it to stop its processes
    local status
    while :; do
        TERMINATED=0
        wait "$TORCHRUN_PID" && status=0 || status=$?
        (( TERMINATED )) || break  # else the wait was cut short by SIGTERM: wait on
    done
    exit "$status"
}

# srun_ PARTITION JOB_NAME SCRIPT ARGS...: GPUS tasks through slurm (GPUS, GPUS_PER_NODE,
# CPUS_PER_TASK, SRUN_ARGS as in mmdet), each running tools/SCRIPT ARGS --launcher slurm.
# GPUS_PER_NODE=0: a CPU partition; no GPU is asked for, the GPUS tasks run on one node as CPU
# processes (gloo), CPUS_PER_TASK cores each (1 unless given), with as many threads.
srun_() {
    local partition=$1 job_name=$2 script=$3
    shift 3
    local gpus=${GPUS:-8} gpus_per_node=${GPUS_PER_NODE:-8} cpus_per_task resources
    check_count GPUS "$gpus"
    check_count GPUS_PER_NODE "$gpus_per_node" 0
    if (( gpus_per_node > 0 )); then
        cpus_per_task=${CPUS_PER_TASK:-5}
        resources=(--gres=gpu:"$gpus_per_node" --ntasks-per-node="$gpus_per_node")
    else
        cpus_per_task=${CPUS_PER_TASK:-1}
        resources=(--nodes=1 --ntasks-per-node="$gpus")
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}
    fi
    check_count CPUS_PER_TASK "$cpus_per_task"
    set -x
    # shellcheck disable=SC2086  # SRUN_ARGS holds several options
    exec srun -p "$partition" \
        --job-name="$job_name" \
        "${resources[@]}" \
        --ntasks="$gpus" \
        --cpus-per-task="$cpus_per_task" \
        --kill-on-bad-exit=1 \
        ${SRUN_ARGS:-} \
        "$PYTHON" -u "$REPO/tools/$script" "$@" --launcher slurm
}
