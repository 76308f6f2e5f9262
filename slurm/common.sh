#!/usr/bin/env bash
# Sourced by every stepwise sbatch script: strict mode, repo root, Python environment, default env,
# rendezvous address, the optional container, the recipe and its overrides, a one-line layout
# summary, the allocation check (`check_allocation`) and `run_stepwise` (runs $RECIPE, keeps its exit
# code). GPUS_PER_NODE: set it before sourcing to override the default (SLURM_GPUS_ON_NODE, else the
# GPUs nvidia-smi lists, else 0 = CPU).
#
# Exported for stepwise's launcher (stepwise/pipeline/launch.py), which starts each stage's workers:
#   STEPWISE_MASTER_ADDR  the first node's address (its NodeAddr in `scontrol show node`, else its name)
#   STEPWISE_MASTER_PORT  a port derived from the job id (concurrent jobs differ)
#   STEPWISE_SRUN_ARGS    extra srun arguments, space-separated (the pyxis container options, plus any
#                         STEPWISE_SRUN_ARGS given at submission)
#   STEPWISE_WORKER_PYTHON  the workers' python inside the container (python3), only with CONTAINER
#   NNODES, GPUS_PER_NODE the allocation's node count and GPUs per node
# MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE are unset: the driver (`stepwise run`, the batch step)
# must never look like a launched worker; the launcher hands the rendezvous to its workers itself.
#
# Container (pyxis): CONTAINER=image adds --container-image=image --container-mounts=$CONTAINER_MOUNTS
# (default: the repo root at the same path) --container-workdir=<repo root> to every srun step. The
# driver itself stays on the batch node's host Python (the repo's .venv or python3 on PATH): it only
# reads manifests and launches steps.
#
# sbatch runs a spooled copy of the batch script, so a script finds this file through the path it
# was submitted under (scontrol's Command=, relative to the submit directory); see tiny_local.sh.
set -euo pipefail

stepwise_root() {
    # STEPWISE_ROOT when set, else the checkout this file lies in (its real path, never the spool).
    if [[ -n "${STEPWISE_ROOT:-}" ]]; then echo "$STEPWISE_ROOT"; return; fi
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

activate_python() {
    # The repo's .venv when present (make install), else python3 on PATH (an NGC container).
    if [[ -f "$STEPWISE_ROOT/.venv/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$STEPWISE_ROOT/.venv/bin/activate"
    fi
    if command -v stepwise >/dev/null; then
        STEPWISE_CMD=(stepwise)
    else
        export PYTHONPATH="$STEPWISE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
        STEPWISE_CMD=(python3 -m stepwise.cli)
    fi
}

export_defaults() {
    # NCCL_* is left to the cluster's own environment.
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
    export TOKENIZERS_PARALLELISM=false
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export PYTHONUNBUFFERED=1
}

count_gpus() {
    # GPUs on this node per nvidia-smi (0 without it): for clusters that do not schedule GPUs as GRES.
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

export_rendezvous() {
    # The first node of the allocation: its NodeAddr (works where node names do not resolve), else its
    # name; a port derived from the job id so concurrent jobs differ. Always computed here: values
    # inherited from the submit shell (another job's) must not leak in.
    local nodelist="${SLURM_JOB_NODELIST:-}" first="" addr=""
    if [[ -n "$nodelist" ]]; then
        first="$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1 || true)"
    fi
    if [[ -n "$first" ]]; then
        addr="$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2 || true)"
    fi
    first="${first:-$(hostname -s)}"
    export STEPWISE_MASTER_ADDR="${addr:-$first}"
    export STEPWISE_MASTER_PORT="$((20000 + ${SLURM_JOB_ID:-0} % 20000))"
    unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
    export NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(count_gpus)}}"
}

export_container() {
    # CONTAINER=image: pyxis options for every srun step (STEPWISE_SRUN_ARGS; stepwise's launcher adds
    # them to its own srun commands, `step` to the scripts'). Paths must not contain spaces.
    STEPWISE_SRUN_ARGS="${STEPWISE_SRUN_ARGS:-}"
    if [[ -n "${CONTAINER:-}" ]]; then
        local mounts="${CONTAINER_MOUNTS:-$STEPWISE_ROOT:$STEPWISE_ROOT}"
        STEPWISE_SRUN_ARGS="${STEPWISE_SRUN_ARGS:+$STEPWISE_SRUN_ARGS }--container-image=$CONTAINER"
        STEPWISE_SRUN_ARGS+=" --container-mounts=$mounts --container-workdir=$STEPWISE_ROOT"
        export STEPWISE_WORKER_PYTHON="${STEPWISE_WORKER_PYTHON:-python3}"
        export PYTHONPATH="$STEPWISE_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the mounted checkout, inside
    fi
    export STEPWISE_SRUN_ARGS
}

step() {
    # step COMMAND...: one task on the first node through srun (in the container when CONTAINER is set);
    # stepwise in the step is `python3 -m stepwise.cli` there, the host's stepwise otherwise.
    # shellcheck disable=SC2086  # STEPWISE_SRUN_ARGS is a space-separated list on purpose
    srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 $STEPWISE_SRUN_ARGS "$@"
}

step_stepwise() {
    # step_stepwise ARGS...: `stepwise ARGS...` as a one-task srun step, from the repo root.
    cd "$STEPWISE_ROOT"
    if [[ -n "${CONTAINER:-}" ]]; then step python3 -m stepwise.cli "$@"; else step "${STEPWISE_CMD[@]}" "$@"; fi
}

take_recipe() {
    # take_recipe DEFAULT [RECIPE.yaml] [key=value ...]: RECIPE = the first argument when it is no
    # override, else $RECIPE, else DEFAULT; OVERRIDES = the rest. A relative recipe is read from the
    # repo root, or from the submit directory when only there.
    local default="$1"
    shift
    if [[ $# -gt 0 && "$1" != *=* ]]; then RECIPE="$1"; shift; fi
    RECIPE="${RECIPE:-$default}"
    local submit="${SLURM_SUBMIT_DIR:-$PWD}"
    if [[ "$RECIPE" != /* && ! -f "$STEPWISE_ROOT/$RECIPE" && -f "$submit/$RECIPE" ]]; then
        RECIPE="$(cd "$submit" && realpath "$RECIPE")"
    fi
    export RECIPE
    OVERRIDES=("$@")
}

print_layout() {
    echo "[stepwise] layout: job=${SLURM_JOB_ID:-none} nodes=$NNODES (${SLURM_JOB_NODELIST:-local})" \
         "gpus_per_node=$GPUS_PER_NODE cpus_per_task=${SLURM_CPUS_PER_TASK:-?}" \
         "master=$STEPWISE_MASTER_ADDR:$STEPWISE_MASTER_PORT recipe=$RECIPE root=$STEPWISE_ROOT" \
         "python=$(command -v python3)${CONTAINER:+ container=$CONTAINER}"
}

check_allocation() {
    # check_allocation [key=value ...]: every stage's layout of $RECIPE (with the overrides) against
    # NNODES x GPUS_PER_NODE, before anything starts; exits 2 naming both when one does not fit.
    local status=0
    (cd "$STEPWISE_ROOT" && python3 -m stepwise.config.allocation "$RECIPE" "$@" \
        --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE") || status=$?
    if [[ "$status" != 0 ]]; then
        echo "[stepwise] the allocation ($NNODES node(s) x $GPUS_PER_NODE GPUs; 0: CPU) does not fit $RECIPE;" \
             "nothing was started (resubmit with matching --nodes/--gpus-per-node or override the layout)" >&2
        exit 2
    fi
}

prepare_recipe() {
    # prepare_recipe DEFAULT [RECIPE.yaml] [key=value ...]: take the recipe and overrides (take_recipe),
    # print the layout, and check the allocation against every stage's layout before anything starts.
    take_recipe "$@"
    print_layout
    check_allocation "${OVERRIDES[@]}"
}

run_stepwise() {
    # run_stepwise [key=value ...]: run $RECIPE from the repo root (relative run.dir= is under it);
    # return its exit code. The run goes in the background so the USR1 warning
    # (#SBATCH --signal=B:USR1@N) reaches it: stepwise passes it to the training workers, which save
    # at the same step and stop; stepwise then exits 75 and the job is requeued (when Slurm allows it,
    # #SBATCH --requeue) to continue from that checkpoint.
    local status=0 child
    cd "$STEPWISE_ROOT"
    "${STEPWISE_CMD[@]}" run "$RECIPE" "$@" &
    child=$!
    trap 'echo "[stepwise] USR1: the job time limit is near; asking the workers to save and stop" >&2; kill -USR1 "$child" 2>/dev/null || true' USR1
    while true; do
        wait "$child" && status=0 || status=$?
        kill -0 "$child" 2>/dev/null || break  # still alive: wait was only interrupted by a signal
    done
    trap - USR1
    echo "[stepwise] exit code: $status"
    if [[ "$status" == "$REQUEUE_EXIT_CODE" && -n "${SLURM_JOB_ID:-}" ]]; then
        echo "[stepwise] saved for requeue; scontrol requeue $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || echo "[stepwise] requeue refused; resubmit the same command to continue" >&2
    fi
    return "$status"
}

REQUEUE_EXIT_CODE=75  # stepwise.train.guard.REQUEUE_EXIT_CODE: saved on purpose, run again to continue
STEPWISE_ROOT="$(stepwise_root)"
export STEPWISE_ROOT
activate_python
export_defaults
export_rendezvous
export_container
