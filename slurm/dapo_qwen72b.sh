#!/usr/bin/env bash
# Skywork DAPO on Qwen2.5-72B-Instruct in one allocation of 8 nodes x 8 GPUs: `stepwise run` (the
# driver) runs here, in the batch step on the first node; every stage's workers are srun steps that
# stepwise launches itself (parallel.launcher=srun in the recipe). Re-submitting the same command, or
# a requeue after the USR1 warning, resumes at the first unfinished stage (and inside it).
#   sbatch slurm/dapo_qwen72b.sh [RECIPE.yaml] [key=value ...]
#   CONTAINER=nvcr.io/nvidia/pytorch:25.01-py3 sbatch slurm/dapo_qwen72b.sh run.dir=/scratch/dapo72b
# Node and GPU counts come from the allocation (sbatch -N / --gpus-per-node override the header) and
# are checked against every stage's layout before anything starts. Set a time limit (-t) the
# cluster accepts: the USR1 warning comes 10 minutes before it.
#SBATCH --job-name=stepwise-dapo-qwen72b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out

RECIPE_DEFAULT=recipes/skywork_dapo/qwen2.5-72b-instruct_8n8g_tp8pp4.yaml

# sbatch runs a spooled copy of this file: find common.sh beside the submitted path (scontrol's
# Command=, relative to the submit directory); outside a batch job, beside this file.
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
here="$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$submitted")" 2>/dev/null && pwd)"
[[ -f "$here/common.sh" ]] || here="$(dirname "${BASH_SOURCE[0]}")"
source "${STEPWISE_ROOT:-$here/..}/slurm/common.sh"

prepare_recipe "$RECIPE_DEFAULT" "$@"
run_stepwise "${OVERRIDES[@]}"
