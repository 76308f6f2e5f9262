#!/usr/bin/env bash
# The embedded pipeline through Slurm on one node (CPU, or GPUs if present). Usage:
#   sbatch slurm/tiny_local.sh [key=value ...]
#   RECIPE=recipes/tiny/smoke.yaml sbatch slurm/tiny_local.sh run.dir=/tmp/smoke
#SBATCH --job-name=stepwise-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=B:USR1@120

source "${STEPWISE_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
export RECIPE="${RECIPE:-recipes/tiny/skywork_dapo_arith.yaml}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-0}"
print_layout
run_stepwise "$@"
