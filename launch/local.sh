#!/usr/bin/env bash
# jaxlm on one host: every local device (GPUs, TPU chips or CPU) in one mesh.
#
# Needs: jaxlm installed on this host (pip install -e .); nothing else.
# Usage:
#   launch/local.sh EXPERIMENT [KEY=VALUE ...]
#   launch/local.sh experiments/gpt2_124m.py mesh.fsdp=8 train.batch_size=64
# Environment knobs (all optional):
#   NPROC=N        start N processes instead of one, joined with jax.distributed over localhost
#                  (with GPUs, process i gets GPU i: one process per GPU). One process is the
#                  usual choice on one host; NPROC exercises the multi-process code paths.
#   CPU_DEVICES=N  fake N CPU devices per process (no accelerator needed) to try a mesh, e.g.
#                  CPU_DEVICES=8 launch/local.sh experiments/tiny.py mesh.fsdp=2 mesh.tensor=2 \
#                    model.vocab_multiple=8 train.steps=20
#   PORT=P         coordinator port for NPROC > 1 (default: a free one).
# The mesh is set with mesh.data / mesh.fsdp / mesh.tensor (one may be -1); see docs/scaling.md.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,17p' "$0"
  exit 2
fi
EXPERIMENT=$1
shift
NPROC=${NPROC:-1}

if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
# Let XLA take most of GPU memory up front (the default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

cmd=(python -m jaxlm.cli train "$EXPERIMENT")
if [[ $# -gt 0 ]]; then cmd+=(--set "$@"); fi

if [[ "$NPROC" -eq 1 ]]; then
  exec "${cmd[@]}"
fi

PORT=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
n_gpus=0
if [[ -z "${CPU_DEVICES:-}" ]] && command -v nvidia-smi > /dev/null; then
  n_gpus=$(nvidia-smi -L | wc -l)
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < NPROC; i++)); do
  gpu_env=()
  if [[ "$n_gpus" -gt 0 ]]; then gpu_env=(CUDA_VISIBLE_DEVICES=$((i % n_gpus))); fi
  env "${gpu_env[@]}" JAXLM_COORDINATOR="127.0.0.1:$PORT" JAXLM_NUM_PROCESSES="$NPROC" JAXLM_PROCESS_ID="$i" \
    "${cmd[@]}" &
  pids+=($!)
done
# The first process to fail stops the rest (they would wait for it forever).
status=0
for ((n = 0; n < NPROC; n++)); do
  if ! wait -n; then status=1; break; fi
done
if [[ $status -ne 0 ]]; then echo "local.sh: a process failed; stopping the others" >&2; exit 1; fi
trap - EXIT
