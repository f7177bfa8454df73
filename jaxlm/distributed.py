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

A lost process (killed, out of memory, its host gone) leaves the others blocked in a collective or
failing in one, and JAX's own runtime reacts 100 s later with a C++ abort. So while a run trains,
``watch_peers`` keeps a heartbeat of each process in the coordinator's key-value store, and the
others exit within ``JAXLM_PEER_TIMEOUT`` seconds (default 10) with one line naming the lost
process and the last complete checkpoint. The loss of process 0, which hosts the coordinator, is
the exception: JAX aborts the others at once with its own message, which this cannot replace.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import jax

from jaxlm.config import ConfigError, MeshConfig
from jaxlm.data.prepare import DataError

# After this long without a heartbeat, JAX's coordinator declares a process dead and aborts all.
JAX_HEARTBEAT_TIMEOUT_S = 100


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
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num,
            process_id=pid,
            heartbeat_timeout_seconds=JAX_HEARTBEAT_TIMEOUT_S,
        )
        return f"explicit: process {pid} of {num} via {address}"
    cluster = detect_cluster()
    if cluster:
        _cpu_collectives()
        # JAX reads SLURM / Open MPI / TPU metadata itself
        jax.distributed.initialize(heartbeat_timeout_seconds=JAX_HEARTBEAT_TIMEOUT_S)
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


# --------------------------------------------------------------------------------------------
# Lost processes.
# --------------------------------------------------------------------------------------------

BEAT_S = 1.0  # how often each process says it is alive
_KEY = "jaxlm/alive/"  # + process index: a beat count, or "done" once it left the run normally


def peer_timeout() -> float:
    """Seconds without a beat after which a process counts as lost (``JAXLM_PEER_TIMEOUT``)."""
    value = os.environ.get("JAXLM_PEER_TIMEOUT", "10")
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not 3 * BEAT_S <= timeout < JAX_HEARTBEAT_TIMEOUT_S:  # JAX's abort must not come first
        raise ConfigError(
            f"JAXLM_PEER_TIMEOUT={value!r} must be seconds in [3, {JAX_HEARTBEAT_TIMEOUT_S}), e.g. 10"
        )
    return timeout


@contextlib.contextmanager
def watch_peers(checkpoints: Path):
    """With several processes, exit this process with one ``error:`` line and status 1 as soon as
    another has not beaten for ``peer_timeout()`` s, whatever this one is doing (a collective with
    a lost peer may fail at once or hang). ``checkpoints``: the run's directory, for that line."""
    if jax.process_count() == 1:
        yield
        return
    timeout = peer_timeout()
    from jax._src import distributed as jax_distributed  # its client, as orbax and multihost_utils use

    client = jax_distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    lock, leaving, finished = threading.Lock(), threading.Event(), threading.Event()

    def beat() -> None:
        seen = {p: (None, time.monotonic()) for p in range(n) if p != me}  # last value, since when
        count = 0
        while not leaving.wait(BEAT_S if count else 0):
            try:
                with lock:
                    if not finished.is_set():
                        client.key_value_set(f"{_KEY}{me}", str(count), allow_overwrite=True)
                values = dict(client.key_value_dir_get(_KEY))
            except Exception as e:  # the coordinator is gone, and with it process 0
                if leaving.is_set():
                    return
                _lost(0, n, f"the coordinator stopped answering: {str(e).splitlines()[0]}", checkpoints)
            count += 1
            now = time.monotonic()
            for p, (last, since) in seen.items():
                value = values.get(f"{_KEY}{p}")
                if value == "done":
                    continue
                if value != last:
                    seen[p] = (value, now)
                elif now - since > timeout:
                    _lost(p, n, f"no heartbeat for {timeout:g} s", checkpoints)

    watchdog = threading.Thread(target=beat, name="jaxlm-watch-peers", daemon=True)
    watchdog.start()

    def stop_watching() -> None:  # before JAX's own exit handler shuts its client down
        leaving.set()
        watchdog.join(timeout=2 * BEAT_S)

    atexit.register(stop_watching)
    try:
        yield
    except (ConfigError, DataError, FloatingPointError):  # this process's own, the same in all
        raise
    except Exception:
        # Maybe a collective that failed because a peer is gone: give the watchdog the time to
        # say so (it exits the process); an error of this process's own is raised after that.
        watchdog.join(timeout=timeout + 2 * BEAT_S)
        raise
    with lock:  # left the run normally: the others must not take the silence for a loss
        finished.set()
        client.key_value_set(f"{_KEY}{me}", "done", allow_overwrite=True)


def _lost(process: int, n: int, why: str, checkpoints: Path) -> None:
    from jaxlm.checkpoint import complete_steps

    steps = complete_steps(checkpoints)
    if steps:
        last = f"the last complete checkpoint is {checkpoints / str(steps[-1])} (step {steps[-1]})"
        last += "; run again to resume"
    else:
        last = f"no checkpoint in {checkpoints} is complete; run again to start over"
    sys.stdout.flush()
    print(f"error: process {process} of {n} was lost ({why}); {last}", file=sys.stderr, flush=True)
    os._exit(1)  # not sys.exit: JAX's exit handler would wait for the lost process, then abort
