#!/usr/bin/env bash
# Fine-tune on a Cloud TPU VM (one host). Install first: pip install -e ".[tpu]"
# Usage: launch/tpu_vm.sh <config> <workdir> [--config.field=value ...]
# On a multi-host pod slice, run the same command on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd gemma4-keras && launch/tpu_vm.sh ..."
# with the workdir on shared storage (gs://... or a shared filesystem).
set -euo pipefail
config=${1:?config file}
workdir=${2:?workdir}
shift 2
exec gemma4-keras train --config="$config" --workdir="$workdir" --config.model.dtype=bfloat16 "$@"
