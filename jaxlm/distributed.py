"""Multi-process start-up with JAX's own runtime (``jax.distributed``).

One process per host (or per GPU); every process runs the same command. Where the coordinator
address, process count and process id come from, first match wins:

1. ``mesh.coordinator_address`` / ``mesh.num_processes`` / ``mesh.process_id`` in the config;
2. ``JAXLM_COORDINATOR`` / ``JAXLM_NUM_PROCESSES`` / ``JAXLM_PROCESS_ID`` in the environment (the
   process id falls back to ``JOB_COMPLETION_INDEX``, which a Kubernetes indexed Job sets);
3. a cluster manager that launched several processes: a SLURM step (``srun``), Open MPI
   (``mpirun``), a TPU pod (GKE or multislice variables, or ``JAXLM_DISTRIBUTED=auto``, which
   launch/tpu_pod.sh sets): ``jax.distributed.initialize()`` then reads everything itself.

Otherwise the run is a single process and nothing is initialized.
"""

from __future__ import annotations

import os

import jax

from jaxlm.config import ConfigError, MeshConfig


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def initialize(cfg: MeshConfig) -> str:
    """Join the other processes of this run, if there are any. Returns how ('' for one process).

    Must run before anything touches a JAX device (the backends are created with the
    distributed client).
    """
    if jax.distributed.is_initialized():
        return "already initialized"
    address = cfg.coordinator_address or os.environ.get("JAXLM_COORDINATOR", "")
    num = cfg.num_processes or _env_int("JAXLM_NUM_PROCESSES", 0)
    pid = cfg.process_id
    if pid < 0:
        pid = _env_int("JAXLM_PROCESS_ID", _env_int("JOB_COMPLETION_INDEX", -1))
    if address or num > 1:
        if not (address and num > 0 and pid >= 0):
            raise ConfigError(
                "multi-process run needs mesh.coordinator_address, mesh.num_processes and mesh.process_id "
                f"(or JAXLM_COORDINATOR/JAXLM_NUM_PROCESSES/JAXLM_PROCESS_ID); got address={address!r}, "
                f"num_processes={num}, process_id={pid}"
            )
        if not 0 <= pid < num:
            raise ConfigError(f"mesh.process_id={pid} must be in [0, mesh.num_processes={num})")
        if ":" not in address:
            raise ConfigError(f"mesh.coordinator_address={address!r} must be host:port, e.g. 10.0.0.1:1234")
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
        return f"explicit: process {pid} of {num} via {address}"
    cluster = detect_cluster()
    if cluster:
        _cpu_collectives()
        jax.distributed.initialize()  # JAX reads SLURM / Open MPI / TPU metadata itself
        return f"{cluster}: process {jax.process_index()} of {jax.process_count()}"
    return ""


def _cpu_collectives() -> None:
    # Cross-process collectives on CPU need an implementation; jax 0.10 defaults to gloo, older
    # versions to none (every cross-process op then fails), so name it. GPU/TPU ignore this.
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def detect_cluster() -> str:
    """Name of the cluster manager that launched several processes of this run, or ''."""
    env = os.environ
    if env.get("JAXLM_DISTRIBUTED", "") == "auto":
        return "JAXLM_DISTRIBUTED=auto"
    # SLURM_STEP_NUM_TASKS exists only inside srun; SLURM_NTASKS alone is also set in the batch
    # script itself, where a lone process must not wait for partners that never start.
    if _env_int("SLURM_STEP_NUM_TASKS", 1) > 1:
        return "slurm"
    if _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1:
        return "openmpi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""):
        return "tpu"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu multislice"
    return ""
