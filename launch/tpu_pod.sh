#!/usr/bin/env bash
# jaxlm on a Cloud TPU VM pod slice (several hosts, e.g. v5litepod-32 = 8 hosts x 4 chips): the
# same command runs on every worker through `gcloud ... ssh --worker=all`. jaxlm then calls
# jax.distributed.initialize() (JAXLM_DISTRIBUTED=auto), which reads the worker list and this
# worker's id from the TPU metadata server; one process per host drives its 4 (or 8) chips.
#
# Needs: gcloud logged in, with the project set (gcloud config set project P); a TPU VM slice:
#   gcloud compute tpus tpu-vm create $TPU_NAME --zone $ZONE \
#     --accelerator-type v5litepod-32 --version v2-alpha-tpuv5-lite
# the repository on every worker at $REPO_DIR with jaxlm and jax[tpu] installed (SETUP=1 below
# does both from this checkout); train.run_dir on a filesystem all workers share (Filestore/NFS
# or a gcsfuse mount), since every worker writes its part of each checkpoint there. Data
# (data.dir) may be per worker: each prepares its own copy if it is missing. A run from an
# earlier launch that still holds the chips must be stopped first (the TPU has one owner).
# Usage:
#   TPU_NAME=my-pod ZONE=us-west4-a launch/tpu_pod.sh EXPERIMENT [KEY=VALUE ...]
#   TPU_NAME=my-pod ZONE=us-west4-a SETUP=1 launch/tpu_pod.sh experiments/llama_1b.py \
#     mesh.fsdp=-1 train.run_dir=/mnt/shared/runs
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM name}
ZONE=${ZONE:?set ZONE to the TPU VM zone}
REPO_DIR=${REPO_DIR:-jaxlm}  # relative to each worker's home directory
if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=... ZONE=... launch/tpu_pod.sh EXPERIMENT [KEY=VALUE ...]" >&2
  exit 2
fi
EXPERIMENT=$1
shift

on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

if [[ "${SETUP:-0}" == 1 ]]; then
  # Ship this checkout (committed files only) to every worker and install it.
  archive=$(mktemp --suffix=.tar.gz)
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":jaxlm.tar.gz --zone "$ZONE" --worker=all
  rm -f "$archive"
  on_all "mkdir -p $REPO_DIR && tar -xzf jaxlm.tar.gz -C $REPO_DIR && pip install -q 'jax[tpu]' -e $REPO_DIR"
fi

args=$(printf ' %q' "$@")
set_args=""
if [[ $# -gt 0 ]]; then set_args=" --set$args"; fi
on_all "cd $REPO_DIR && JAXLM_DISTRIBUTED=auto python -m jaxlm.cli train $(printf %q "$EXPERIMENT")$set_args"
