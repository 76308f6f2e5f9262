#!/usr/bin/env bash
# Greedy evaluation of a recipe's policy: runs its `eval` stage (`stepwise stage eval RECIPE ...`) in
# an allocation of its own, one node of 8 GPUs by default (sbatch -N / --gpus-per-node for others).
#   sbatch slurm/eval.sh [RECIPE.yaml] [key=value ...]
#   sbatch -N 8 slurm/eval.sh recipes/skywork_dapo/qwen2.5-72b-instruct_8n8g_tp8pp4.yaml
#SBATCH --job-name=stepwise-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out

RECIPE_DEFAULT=recipes/skywork_dapo/qwen2.5-math-7b-instruct_1n8g_tp4.yaml

# sbatch runs a spooled copy of this file: find common.sh beside the submitted path.
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
here="$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$submitted")" 2>/dev/null && pwd)"
[[ -f "$here/common.sh" ]] || here="$(dirname "${BASH_SOURCE[0]}")"
source "${STEPWISE_ROOT:-$here/..}/slurm/common.sh"

prepare_recipe "$RECIPE_DEFAULT" "$@"
cd "$STEPWISE_ROOT"
status=0
"${STEPWISE_CMD[@]}" stage eval "$RECIPE" "${OVERRIDES[@]}" || status=$?
echo "[stepwise] exit code: $status"
exit "$status"
