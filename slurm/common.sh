#!/usr/bin/env bash
# Sourced by every stepwise sbatch script: strict mode, repo root, Python environment, rendezvous
# address, a one-line layout summary, and `run_stepwise` (runs a recipe, keeps its exit code).
set -euo pipefail

stepwise_root() {
    # sbatch runs a spooled copy of the script, so its own path is no guide: prefer STEPWISE_ROOT,
    # then the submit directory if it is a stepwise checkout.
    if [[ -n "${STEPWISE_ROOT:-}" ]]; then echo "$STEPWISE_ROOT"; return; fi
    if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/pyproject.toml" && -d "${SLURM_SUBMIT_DIR}/stepwise" ]]; then
        echo "$SLURM_SUBMIT_DIR"; return
    fi
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

activate_python() {
    # The repo's .venv when present (make install), else the python3 on PATH (an NGC container).
    if [[ -f "$STEPWISE_ROOT/.venv/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$STEPWISE_ROOT/.venv/bin/activate"
    fi
    command -v stepwise >/dev/null || { echo "[stepwise] error: 'stepwise' not on PATH (run make install)" >&2; exit 2; }
}

export_defaults() {
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
    export TOKENIZERS_PARALLELISM=false
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}"
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

print_layout() {
    echo "[stepwise] layout: job=${SLURM_JOB_ID:-none} nodes=$NNODES gpus_per_node=$GPUS_PER_NODE" \
         "cpus_per_task=${SLURM_CPUS_PER_TASK:-?} master=$MASTER_ADDR:$MASTER_PORT recipe=$RECIPE root=$STEPWISE_ROOT"
}

run_stepwise() {
    # run_stepwise [key=value ...]: run $RECIPE from the repo root and return its exit code.
    local status=0
    (cd "$STEPWISE_ROOT" && stepwise run "$RECIPE" "$@") || status=$?
    echo "[stepwise] exit code: $status"
    return "$status"
}

STEPWISE_ROOT="$(stepwise_root)"
export STEPWISE_ROOT
activate_python
export_defaults
export_rendezvous
