#!/usr/bin/env bash
# DQO and its baselines (SFT, RS, DPO, KTO, DRO) for Qwen2-7B-Instruct on MATH, one node of 8 GPUs
# (TP 4, DP 2). Re-submitting the same command, or a requeue after the USR1 warning, resumes at the
# first unfinished stage.
#   sbatch slurm/dqo_qwen2_7b.sh [RECIPE.yaml] [key=value ...]
#   sbatch slurm/dqo_qwen2_7b.sh recipes/dqo/qwen2-7b-instruct_gsm8k_1n8g_tp4.yaml
#SBATCH --job-name=stepwise-dqo-qwen2-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out

RECIPE_DEFAULT=recipes/dqo/qwen2-7b-instruct_1n8g_tp4.yaml

# sbatch runs a spooled copy of this file: find common.sh beside the submitted path.
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
here="$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$submitted")" 2>/dev/null && pwd)"
[[ -f "$here/common.sh" ]] || here="$(dirname "${BASH_SOURCE[0]}")"
source "${STEPWISE_ROOT:-$here/..}/slurm/common.sh"

prepare_recipe "$RECIPE_DEFAULT" "$@"
run_stepwise "${OVERRIDES[@]}"
