#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker (jax.distributed finds the others).
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config pixellm_7b train.output_dir=gs://bucket/run
# The repository and its .venv (`bash quickstart.sh` or `pip install -e . "jax[tpu]"`) must be at
# $REPO (default ~/pixellm-jax) on every worker; output_dir should be shared storage (a GCS path)
# so that every host writes its share of each checkpoint into the same place.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo="${REPO:-~/pixellm-jax}"
args=$(printf ' %q' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $repo && . .venv/bin/activate && pixellm train$args"
