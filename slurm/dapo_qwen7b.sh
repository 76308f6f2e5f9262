#!/usr/bin/env bash
# Skywork DAPO on Qwen2.5-Math-7B-Instruct on one node of 8 GPUs (TP 4, DP 2; torchrun on the node).
# Re-submitting the same command, or a requeue after the USR1 warning, resumes at the first
# unfinished stage.
#   sbatch slurm/dapo_qwen7b.sh [RECIPE.yaml] [key=value ...]
#SBATCH --job-name=stepwise-dapo-qwen7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out

RECIPE_DEFAULT=recipes/skywork_dapo/qwen2.5-math-7b-instruct_1n8g_tp4.yaml

# sbatch runs a spooled copy of this file: find common.sh beside the submitted path.
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
here="$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$submitted")" 2>/dev/null && pwd)"
[[ -f "$here/common.sh" ]] || here="$(dirname "${BASH_SOURCE[0]}")"
source "${STEPWISE_ROOT:-$here/..}/slurm/common.sh"

prepare_recipe "$RECIPE_DEFAULT" "$@"
run_stepwise "${OVERRIDES[@]}"
