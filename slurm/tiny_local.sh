#!/usr/bin/env bash
# The tiny embedded pipeline through Slurm on one node (CPU unless GPUS_PER_NODE is set). Submit from
# the repo root (or set STEPWISE_ROOT); extra arguments are recipe overrides. Usage:
#   sbatch slurm/tiny_local.sh [key=value ...]
#   RECIPE=recipes/tiny/smoke.yaml sbatch slurm/tiny_local.sh run.dir=/tmp/smoke
#SBATCH --job-name=stepwise-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=B:USR1@120

export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
export RECIPE="${RECIPE:-recipes/tiny/skywork_dapo_arith.yaml}"
source "${STEPWISE_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
print_layout
run_stepwise "$@"
