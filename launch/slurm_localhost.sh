#!/usr/bin/env bash
# A one-node SLURM cluster on this machine: munge, slurmctld and slurmd for one node named after
# `hostname -s`, with the CPUs and memory slurmd finds here, in one partition "local". For the tests
# of launch/slurm.sbatch and `jaxlm sweep --executor slurm` (tests/test_tools.py; .ci/run starts it),
# and for trying the SLURM path on a workstation.
#
# Needs: root, and Debian's packages (this script installs nothing): apt-get install -y slurm-wlm munge
# Usage:  launch/slurm_localhost.sh          # (re)start it; returns once the node is idle
#         launch/slurm_localhost.sh stop     # stop the daemons it started
# Writes /etc/slurm/slurm.conf (the previous one, if any, is kept as slurm.conf.bak) and logs to
# /var/log/slurm/. Jobs run as the user who submits them; nothing is accounted (no slurmdbd).
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "launch/slurm_localhost.sh must run as root (it writes /etc/slurm and starts daemons)"
for cmd in munged mungekey slurmctld slurmd sinfo; do
  command -v "$cmd" > /dev/null || die "$cmd not found; install SLURM first: apt-get install -y slurm-wlm munge"
done

RUN=/run/slurm-localhost
stop() { # only the daemons this script started, by the pids they wrote
  for pidfile in "$RUN"/slurmd.pid "$RUN"/slurmctld.pid "$RUN"/munged.pid; do
    if [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2> /dev/null; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
}
if [[ "${1:-}" == stop ]]; then stop; exit 0; fi
stop
mkdir -p "$RUN" /var/log/slurm /var/spool/slurm-localhost/ctld /var/spool/slurm-localhost/d

# ---- munge: the credentials slurmctld, slurmd and the clients sign with -----------------------
if [[ ! -s /etc/munge/munge.key ]]; then mungekey --create --keyfile=/etc/munge/munge.key; fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then # not already served (e.g. by systemd)
  runuser -u munge -- munged --pid-file="$RUN/munged.pid"
  for _ in $(seq 50); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.1; done
fi

# ---- slurm.conf: this host is the controller and the one compute node --------------------------
host=$(hostname -s)
# The node's name must resolve: slurmctld looks itself up, and jax.distributed's coordinator is
# the step's first node by name.
if ! getent hosts "$host" > /dev/null; then echo "127.0.0.1 $host" >> /etc/hosts; fi
node=$(slurmd -C | head -1) # "NodeName=HOST CPUs=.. Boards=.. ... RealMemory=..", as slurmd sees it
mkdir -p /etc/slurm
if [[ -f /etc/slurm/slurm.conf ]] && ! grep -q '^# Written by launch/slurm_localhost.sh' /etc/slurm/slurm.conf; then
  cp /etc/slurm/slurm.conf /etc/slurm/slurm.conf.bak
fi
cat > /etc/slurm/slurm.conf << EOF
# Written by launch/slurm_localhost.sh: one node, this host.
ClusterName=localhost
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups: a container often has no writable cgroup tree. Processes are tracked by parent pid;
# task/affinity takes srun's --cpu-bind (slurm.sbatch: none).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurm-localhost/ctld
SlurmdSpoolDir=/var/spool/slurm-localhost/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Quick turnover between the jobs of a test.
MinJobAge=30
KillWait=5
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

# ---- the daemons (each forks into the background and writes its pid file) ---------------------
slurmctld -c # -c: no state from an earlier cluster (jobs, node states)
slurmd
for _ in $(seq 100); do
  state=$(sinfo -h -n "$host" -o %T 2> /dev/null || true)
  if [[ "$state" == idle ]]; then
    echo "slurm_localhost: node $host idle: ${node#NodeName=}"
    exit 0
  fi
  sleep 0.2
done
die "node $host did not become idle (state '${state:-none}'); see /var/log/slurm/slurmctld.log and slurmd.log"
