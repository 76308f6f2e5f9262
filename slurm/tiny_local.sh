#!/usr/bin/env bash
# The tiny embedded pipeline through Slurm on one node (CPU unless GPUS_PER_NODE is set). Submit from
# any directory; the recipe is the first argument, else $RECIPE, else the demo; the other arguments
# are recipe overrides (a relative run.dir= is under the repo root). Usage:
#   sbatch slurm/tiny_local.sh [RECIPE.yaml] [key=value ...]
#   RECIPE=recipes/tiny/smoke.yaml sbatch slurm/tiny_local.sh run.dir=/tmp/smoke
#SBATCH --job-name=stepwise-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=B:USR1@120

# sbatch runs a spooled copy of this file: find common.sh beside the submitted path (scontrol's
# Command=, relative to the submit directory); outside a batch job, beside this file.
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
here="$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$submitted")" 2>/dev/null && pwd)"
[[ -f "$here/common.sh" ]] || here="$(dirname "${BASH_SOURCE[0]}")"
export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
source "${STEPWISE_ROOT:-$here/..}/slurm/common.sh"

take_recipe recipes/tiny/skywork_dapo_arith.yaml "$@"
print_layout
run_stepwise "${OVERRIDES[@]}"
