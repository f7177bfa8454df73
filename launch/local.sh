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
#   GRACE=S        NPROC > 1: when one process fails, seconds the others get to exit by themselves
#                  (they do within JAXLM_PEER_TIMEOUT, 10 s) before they are stopped (default 30).
#                  The script waits for every process and exits with the first failure's status.
# The mesh is set with mesh.data / mesh.fsdp / mesh.tensor (one may be -1); see docs/scaling.md.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,20p' "$0"
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
# Each process in its own process group (job control), so that Ctrl-C reaches this script only and
# the processes get exactly one signal, forwarded below: they finish the step, checkpoint together
# and exit (a second signal would make them exit at once, without a checkpoint).
set -m
pids=()
for ((i = 0; i < NPROC; i++)); do
  gpu_env=()
  if [[ "$n_gpus" -gt 0 ]]; then gpu_env=(CUDA_VISIBLE_DEVICES=$((i % n_gpus))); fi
  env "${gpu_env[@]}" JAXLM_COORDINATOR="127.0.0.1:$PORT" JAXLM_NUM_PROCESSES="$NPROC" JAXLM_PROCESS_ID="$i" \
    "${cmd[@]}" &
  pids+=($!)
done
signal_all() { for p in "${pids[@]}"; do kill "-$1" "$p" 2> /dev/null || true; done; }
trap 'signal_all INT' INT
trap 'signal_all TERM' TERM
trap 'signal_all TERM' EXIT # should this script die early
# Wait for every process. When one fails, the others notice within JAXLM_PEER_TIMEOUT (10 s) and
# exit by themselves, saying so; any still running GRACE seconds later is stopped.
status=0
killer=
left=("${pids[@]}")
while [[ ${#left[@]} -gt 0 ]]; do
  done_pid=
  rc=0
  wait -n -p done_pid "${left[@]}" 2> /dev/null || rc=$? # (bash's own "Killed" notice: said below)
  if [[ -z "${done_pid:-}" ]]; then continue; fi # woken by a forwarded signal (unsets it)
  still=()
  for ((i = 0; i < NPROC; i++)); do
    if [[ "${pids[i]}" == "$done_pid" ]]; then id=$i; fi
  done
  for p in "${left[@]}"; do if [[ "$p" != "$done_pid" ]]; then still+=("$p"); fi; done
  left=("${still[@]}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    how="exited with status $rc"
    if [[ $rc -gt 128 ]]; then how="was killed by SIG$(kill -l $((rc - 128)))"; fi
    echo "local.sh: process $id of $NPROC $how; giving the others ${GRACE:-30} s to exit" >&2
    if [[ ${#left[@]} -gt 0 ]]; then
      (sleep "${GRACE:-30}"; kill -TERM "${left[@]}"; sleep 10; kill -KILL "${left[@]}") 2> /dev/null &
      killer=$!
      disown "$killer" # no job notice when it is stopped below
    fi
  fi
done
if [[ -n "$killer" ]]; then kill -- "-$killer" 2> /dev/null || true; fi # its own group (set -m)
trap - EXIT
exit "$status"
