#!/usr/bin/env bash
# Fine-tune on several GPU nodes under SLURM: one process per node (default)
# or one per GPU, every process running the same `gemma4-keras train`.
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --wrap \
#     "srun launch/gpu_multihost.sh configs/31b_qlora.py /shared/runs/31b \
#        --config.distribution.mode=model --config.distribution.model_parallel=8"
#   (one process per GPU: --ntasks-per-node=8 and GEMMA4_PROCS=gpu)
#
# The coordinator is the first node of the job on port GEMMA4_COORDINATOR_PORT
# (default 12000 + SLURM_JOB_ID % 20000). The workdir must be on storage all
# nodes share: process 0 writes the files, every process writes its
# checkpoint shards. train.batch_size is the global batch. Rerunning the same
# command resumes, also with another number of nodes.
set -euo pipefail
config=${1:?config file, e.g. configs/31b_qlora.py}
workdir=${2:?workdir on shared storage, e.g. /shared/runs/31b}
shift 2
: "${SLURM_NTASKS:?run under SLURM (srun), or set SLURM_NTASKS}"
: "${SLURM_PROCID:?run under SLURM (srun), or set SLURM_PROCID}"
nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?no SLURM_JOB_NODELIST}}

first_node() {
  # The first host of a SLURM node list: "gpu[03-05,07],cpu1" -> gpu03.
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
    return
  fi
  local head=${1%%,*}
  if [[ $1 =~ ^([^,\[]+)\[([0-9]+) ]]; then
    head=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
  fi
  echo "$head"
}

port=${GEMMA4_COORDINATOR_PORT:-$((12000 + ${SLURM_JOB_ID:-0} % 20000))}
coordinator=$(first_node "$nodes")
export JAX_COORDINATOR_ADDRESS=$coordinator:$port
export JAX_NUM_PROCESSES=$SLURM_NTASKS
export JAX_PROCESS_ID=$SLURM_PROCID
if [[ ${GEMMA4_PROCS:-node} == gpu ]]; then
  # One process per GPU: this task's GPU only.
  export JAX_LOCAL_DEVICE_IDS=${SLURM_LOCALID:?GEMMA4_PROCS=gpu needs SLURM_LOCALID}
fi
# Let XLA take GPU memory as needed instead of preallocating 75%.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec gemma4-keras train --config="$config" --workdir="$workdir" "$@"
