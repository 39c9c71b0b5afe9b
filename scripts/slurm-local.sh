#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, with accounting: what the `slurm` tests run against,
# and a place to try `hydra/launcher=submitit_slurm` before a real cluster.
#
#   scripts/slurm-local.sh start    # install what is missing (apt), start it clean, wait until the node is idle
#   scripts/slurm-local.sh stop     # stop every daemon start started (and any job still running)
#   scripts/slurm-local.sh status   # the daemons, the node, the partition
#
# Runs as root (no init system needed). Daemons: munged (authentication), MariaDB and slurmdbd
# (accounting: submitit polls job states with `sacct`; without it a cancelled job's state is unknown
# and the launcher waits for ever), slurmctld and slurmd. The node declares this machine's real CPUs
# and memory (less headroom) and a DefMemPerCPU, so that a job that asks for no memory claims its
# share, not the whole node. `start` always starts clean: the controller forgets earlier jobs (-c)
# and the accounting database is recreated, so job ids never meet an earlier run's records.
# Running `start` twice restarts the cluster; `stop` with nothing running does nothing.
set -euo pipefail

STATE=${QATFLASH_SLURM_STATE:-/var/lib/qatflash-slurm}
CLUSTER=qatflash
PARTITION=local
HEADROOM_MIB=1024
DB=slurm_acct_db
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MYSQL_SOCKET=/run/mysqld/mysqld.sock
# The daemons this script starts, by pid files of its own, in the order they start (stop takes
# them in reverse): stop never touches a daemon it did not start.
RUN=/run/qatflash-slurm
PIDFILES=("$RUN/munged.pid" "$RUN/mariadbd.pid" "$RUN/slurmdbd.pid" "$RUN/slurmctld.pid" "$RUN/slurmd.pid")

say() { echo "slurm-local: $*" >&2; }

# Poll `$@` every 0.2 s until it succeeds; fail after $1 seconds naming what did not come up.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "$what did not come up within ${seconds}s; logs: $STATE/log"
      exit 1
    fi
    sleep 0.2
  done
}

install_missing() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v munged >/dev/null || missing+=(munge)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

start_munge() {
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge /etc/munge
  install -d -o munge -g munge -m 755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  # --force: munged otherwise refuses to start as root beside a folder it does not own.
  munged --force --log-file="$STATE/log/munged.log" --pid-file="$RUN/munged.pid" 2>/dev/null ||
    { say "munged did not start; log: $STATE/log/munged.log"; exit 1; }
  wait_for 20 munged munge -n
}

start_mariadb() {
  install -d -o mysql -g mysql /run/mysqld
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  mariadbd --user=mysql --datadir=/var/lib/mysql --socket=$MYSQL_SOCKET --bind-address=127.0.0.1 \
    --pid-file="$RUN/mariadbd.pid" >>"$STATE/log/mariadb.log" 2>&1 &
  wait_for 60 MariaDB mariadb-admin --socket=$MYSQL_SOCKET ping
  # A fresh database each start: job ids restart at 1 with the controller's state, and old records
  # under the same ids would answer sacct's queries.
  mariadb --socket=$MYSQL_SOCKET <<SQL
DROP DATABASE IF EXISTS $DB;
CREATE DATABASE $DB;
SQL
}

write_configs() {
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - HEADROOM_MIB))
  mkdir -p /etc/slurm
  cat >"$DBD_CONF" <<CONF
# Written by scripts/slurm-local.sh: accounting on the local MariaDB, as root through its socket.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB
StorageUser=root
CONF
  chmod 600 "$DBD_CONF"
  cat >"$SLURM_CONF" <<CONF
# Written by scripts/slurm-local.sh: one node, this machine ($cpus CPUs, $memory MiB after ${HEADROOM_MIB} MiB headroom).
ClusterName=$CLUSTER
# The daemons talk over loopback: no name lookup of this host is needed.
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# CPUs, not cores, are what jobs are given, with their memory.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((memory / cpus))
SchedulerType=sched/backfill
ReturnToService=2
# Jobs may be requeued (scontrol requeue, preemption); a cancelled job's steps get SIGTERM, then SIGKILL after KillWait.
JobRequeue=1
KillWait=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

node_idle() {
  [[ $(sinfo -h -N -o %T 2>/dev/null) == idle ]]
}

start() {
  [[ $EUID -eq 0 ]] || { say "must run as root (it installs packages and starts daemons)"; exit 1; }
  stop
  install_missing
  rm -rf "$STATE"
  mkdir -p "$STATE/log" "$STATE/ctld" "$STATE/slurmd" "$RUN"
  chmod 755 "$RUN"  # mariadbd writes its pid file as the mysql user
  chown mysql "$RUN" 2>/dev/null || true
  write_configs
  start_munge
  start_mariadb
  slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  slurmctld -c   # -c: clean, no jobs restored from an earlier state
  wait_for 60 slurmctld scontrol ping
  slurmd
  wait_for 90 "the node ($(hostname -s), idle)" node_idle
  say "up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MiB %T')"
}

# The pid in `file` if that process is alive.
alive_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop() {
  local pid file
  # Jobs still running go first, cancelled the ordinary way (SIGTERM, SIGKILL after KillWait), so
  # that none of their processes outlives the daemons that would have stopped it.
  if alive_pid "$RUN/slurmctld.pid" >/dev/null && alive_pid "$RUN/slurmd.pid" >/dev/null; then
    squeue -h -o %A | xargs -r scancel
    for _ in $(seq 200); do [[ -z $(squeue -h -o %A) ]] && break; sleep 0.2; done
  fi
  for ((i = ${#PIDFILES[@]} - 1; i >= 0; i--)); do
    file=${PIDFILES[i]}
    if pid=$(alive_pid "$file"); then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      say "stopped $(basename "$file" .pid)"
    fi
    rm -f "$file"
  done
}

status() {
  local file pid up=0
  for file in "${PIDFILES[@]}"; do
    if pid=$(alive_pid "$file"); then
      echo "$(basename "$file" .pid): running (pid $pid)"
    else
      echo "$(basename "$file" .pid): stopped"
      up=1
    fi
  done
  if ((up == 0)); then
    sinfo -N -o '%N %P %T %c %m'
  fi
  return $up
}

case ${1:-} in
  start | stop | status) "$1" ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
