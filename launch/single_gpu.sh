#!/usr/bin/env bash
# Fine-tune on one GPU. Usage:
#   launch/single_gpu.sh <config> <workdir> [--config.field=value ...]
# e.g.
#   launch/single_gpu.sh configs/e4b_qlora.py runs/e4b --config.data.path=train.jsonl
# Rerunning the same command resumes from the last checkpoint.
set -euo pipefail
config=${1:?config file, e.g. configs/e4b_qlora.py}
workdir=${2:?workdir, e.g. runs/e4b}
shift 2
# Let XLA take GPU memory as needed instead of preallocating 75%.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec gemma4-keras train --config="$config" --workdir="$workdir" "$@"
