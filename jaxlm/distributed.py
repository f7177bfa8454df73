"""Multi-process start-up with JAX's own runtime (``jax.distributed``).

One process per host (or per GPU). The coordinator address, process count and id come from the
config when given, else from the environment: JAX's cluster auto-detection covers SLURM, TPU pods,
Open MPI and Kubernetes; ``JAXLM_COORDINATOR``/``JAXLM_NUM_PROCESSES``/``JAXLM_PROCESS_ID`` cover
everything else (e.g. two processes on one machine).
"""

from __future__ import annotations

import os

import jax

from jaxlm.config import ConfigError, MeshConfig


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def initialize(cfg: MeshConfig) -> None:
    """Join the other processes of this run, if there are any; a no-op for one process."""
    if jax.distributed.is_initialized():
        return
    address = cfg.coordinator_address or os.environ.get("JAXLM_COORDINATOR", "")
    num = cfg.num_processes or _env_int("JAXLM_NUM_PROCESSES", 0)
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int("JAXLM_PROCESS_ID", -1)
    if address or num > 1:
        if not (address and num > 0 and pid >= 0):
            raise ConfigError(
                "multi-process run needs mesh.coordinator_address, mesh.num_processes and mesh.process_id "
                f"(or JAXLM_COORDINATOR/JAXLM_NUM_PROCESSES/JAXLM_PROCESS_ID); got address={address!r}, "
                f"num_processes={num}, process_id={pid}"
            )
        if not 0 <= pid < num:
            raise ConfigError(f"mesh.process_id={pid} must be in [0, num_processes={num})")
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
        return
    if _cluster_detected():
        jax.distributed.initialize()  # JAX reads SLURM / TPU pod / Open MPI / Kubernetes itself


def _cluster_detected() -> bool:
    """True when a cluster manager launched several processes of this run."""
    return (
        _env_int("SLURM_NTASKS", 1) > 1
        or _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or "JOB_COMPLETION_INDEX" in os.environ  # Kubernetes indexed Job / JobSet
    )
