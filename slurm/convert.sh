#!/usr/bin/env bash
# Checkpoint conversion as one srun step on one node (CPU is enough; it streams one tensor or layer at
# a time, so a 72B model fits a 64 GB host). Every argument goes to `stepwise convert`:
#   sbatch slurm/convert.sh hf-to-megatron --hf /models/Qwen2.5-72B-Instruct --out ckpt/qwen-72b
#   sbatch slurm/convert.sh megatron-to-hf --ckpt ckpt/qwen-72b --out hf/qwen-72b --max-shard-size 5GB
#   sbatch --gpus-per-node=1 slurm/convert.sh ...      # on a GPU partition
# Relative paths are under the repo root. CONTAINER=image runs the step in a pyxis container.
#SBATCH --job-name=stepwise-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --output=slurm-%x-%j.out

# sbatch runs a spooled copy of this file: find common.sh beside the submitted path.
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
here="$(cd "${SLURM_SUBMIT_DIR:-.}" && cd "$(dirname "$submitted")" 2>/dev/null && pwd)"
[[ -f "$here/common.sh" ]] || here="$(dirname "${BASH_SOURCE[0]}")"
export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
source "${STEPWISE_ROOT:-$here/..}/slurm/common.sh"

if [[ $# -eq 0 ]]; then
    echo "usage: sbatch slurm/convert.sh {hf-to-megatron|megatron-to-hf|nemo-to-megatron} ARGS..." >&2
    exit 2
fi
echo "[stepwise] convert: job=${SLURM_JOB_ID:-none} node=${SLURMD_NODENAME:-$(hostname -s)}" \
     "gpus=$GPUS_PER_NODE root=$STEPWISE_ROOT${CONTAINER:+ container=$CONTAINER}: stepwise convert $*"
status=0
step_stepwise convert "$@" || status=$?
echo "[stepwise] exit code: $status"
exit "$status"
