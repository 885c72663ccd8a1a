#!/usr/bin/env bash
# Fine-tune on a multi-host Cloud TPU slice (v5e-16, v5p-32, ...): run the
# same command on every worker; JAX finds the other workers itself.
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=\
#     "cd gemma4-keras && launch/tpu_pod.sh configs/26b_a4b_qlora.py gs://bucket/runs/26b \
#        --config.distribution.mode=model --config.distribution.model_parallel=4"
#
# Install first on every worker: pip install -e ".[tpu]". The workdir must be
# storage all workers share (gs://... or a shared filesystem): worker 0 writes
# the files, every worker writes its checkpoint shards. train.batch_size is
# the global batch. Rerunning the same command on all workers resumes.
set -euo pipefail
config=${1:?config file, e.g. configs/26b_a4b_qlora.py}
workdir=${2:?workdir on shared storage, e.g. gs://bucket/runs/26b}
shift 2
# jax.distributed.initialize() with the slice's own topology (no address).
export GEMMA4_DISTRIBUTED=auto
exec gemma4-keras train --config="$config" --workdir="$workdir" \
  --config.model.dtype=bfloat16 "$@"
