#!/usr/bin/env bash
# Sourced by every stepwise sbatch script: strict mode, repo root, Python environment, default env,
# rendezvous address, the recipe and its overrides, a one-line layout summary, and `run_stepwise`
# (runs $RECIPE, keeps its exit code). Set GPUS_PER_NODE before sourcing to override the default
# (SLURM_GPUS_ON_NODE, else 8; 0 = CPU).
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

export_rendezvous() {
    # First host of the allocation; a port derived from the job id so concurrent jobs differ.
    local nodelist="${SLURM_JOB_NODELIST:-$(hostname -s)}"
    MASTER_ADDR="$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1 || true)"
    export MASTER_ADDR="${MASTER_ADDR:-$(hostname -s)}"
    export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
    export NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
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
         "gpus_per_node=$GPUS_PER_NODE cpus_per_task=${SLURM_CPUS_PER_TASK:-?} master=$MASTER_ADDR:$MASTER_PORT" \
         "recipe=$RECIPE root=$STEPWISE_ROOT python=$(command -v python3)"
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
