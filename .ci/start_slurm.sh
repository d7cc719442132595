#!/usr/bin/env bash
# Single-node SLURM 22.05 (Debian 12) for the astra_thepayne CI and the real-cluster tests; run as root;
# no systemd, no cgroups. Adapted from the project's shared CI infrastructure script.
#   bash .ci/start_slurm.sh        # install if needed, start munged+slurmctld+slurmd, run a smoke job
#   SLURM_ACCOUNTING=1 bash .ci/start_slurm.sh   # also MariaDB + slurmdbd, so `sacct` works
#   bash .ci/start_slurm.sh stop   # stop the daemons this script started (by PID)
# Env overrides: SLURM_BASE SLURM_REALMEM_MB SLURM_SMOKE=0 SLURM_ACCOUNTING=1 SLURM_DB_PORT
# Clients need SLURM_CONF (written to $SLURM_BASE/env.sh) unless you link /etc/slurm/slurm.conf.
set -euo pipefail

BASE=${SLURM_BASE:-$(dirname "$(mktemp -u)")/thepayne-ci/slurm}
CONF=$BASE/slurm.conf
export SLURM_CONF=$CONF            # slurmdbd reads slurmdbd.conf from this same folder
MUNGE_PID=/run/munge/munged.pid
ACCT=${SLURM_ACCOUNTING:-0}
DBPORT=${SLURM_DB_PORT:-3306}
MY=$BASE/mysql

# alive PIDFILE: true if the PID in it is a live, non-zombie process
# (PID 1 here reaps orphans lazily, so `kill -0` alone can report a zombie as alive)
alive() {
  local p st
  p=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$p" ] && [ -r "/proc/$p/stat" ] || return 1
  st=$(sed 's/.*) //' "/proc/$p/stat" | cut -d' ' -f1)
  [ "$st" != Z ] && [ "$st" != X ]
}
stop_pidfile() {  # TERM, wait up to 10 s, then KILL
  local p i
  alive "$1" || return 0
  p=$(cat "$1"); kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 100); do alive "$1" || return 0; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
}
wait_for() {  # wait_for SECONDS CMD...: retry every 0.2 s
  local n=$(( $1 * 5 )); shift
  for i in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
fail() { echo "$*" >&2; tail -n 20 "$BASE"/log/*.log >&2 2>/dev/null || true; exit 1; }

if [ "${1:-}" = stop ]; then
  stop_pidfile "$BASE/slurmd.pid"; stop_pidfile "$BASE/slurmctld.pid"
  stop_pidfile "$BASE/slurmdbd.pid"; stop_pidfile "$MY/mysqld.pid"; stop_pidfile "$MUNGE_PID"
  exit 0
fi

# 1. install: these 4 packages are enough (the slurm-wlm metapackage pulls ~40 of plugins)
PKGS=()
{ [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && command -v sbatch >/dev/null; } \
  || PKGS+=(munge slurmctld slurmd slurm-client)
if [ "$ACCT" = 1 ]; then
  [ -x /usr/sbin/slurmdbd ] || PKGS+=(slurmdbd)
  [ -x /usr/sbin/mariadbd ] || PKGS+=(mariadb-server)
fi
if [ ${#PKGS[@]} -gt 0 ]; then
  added_policy=0   # keep apt from trying to start the daemons with the packaged config
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added_policy=1
  fi
  mkdir -p "$BASE"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PKGS[@]}"; } \
      >"$BASE/apt.log" 2>&1 || rc=$?
  [ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "${rc:-0}" = 0 ] || { tail -n 30 "$BASE/apt.log" >&2; exit 1; }
fi
mkdir -p "$BASE"/{state,spool,log}

# 2. munge: key (the package's postinst makes one; make it if missing), socket dir, daemon
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge          # /run is emptied on reboot
if ! alive "$MUNGE_PID"; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PID"
  runuser -u munge -- /usr/sbin/munged
fi
wait_for 10 sh -c 'munge -n </dev/null | unmunge' || fail "munged not answering"

NODE=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)   # slurmd's own idea of its name

if [ "$ACCT" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

# 3. slurm.conf, regenerated whenever slurmctld/slurmd are (re)started
RESTART=0
if ! { alive "$BASE/slurmctld.pid" && alive "$BASE/slurmd.pid" \
        && grep -qxF "${ACCT_LINES%%$'\n'*}" "$CONF" 2>/dev/null; }; then
  stop_pidfile "$BASE/slurmd.pid"; stop_pidfile "$BASE/slurmctld.pid"
  HW=$(/usr/sbin/slurmd -C 2>/dev/null | head -n1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//')
  [ -n "$HW" ] || HW="CPUs=$(nproc)"
  MEM_MB=${SLURM_REALMEM_MB:-$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 9 / 10 ))}
  cat >"$CONF" <<EOF
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
# no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT_LINES
# finished jobs: one line each (state, exit code) here, kept after MinJobAge
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule every second instead of every 3 s or so: arrays finish 2-3x sooner
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
# finished jobs stay visible to squeue/scontrol for 10 min
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 $HW RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  RESTART=1
fi

# 4. optional accounting: throwaway MariaDB + slurmdbd, so sacct has a database
#    (sacctmgr reads slurm.conf, so this comes after writing it)
if [ "$ACCT" = 1 ]; then
  if ! alive "$MY/mysqld.pid"; then
    install -d -o mysql -g mysql "$MY" "$MY/data"
    [ -d "$MY/data/mysql" ] || mariadb-install-db --user=mysql --datadir="$MY/data" \
        --auth-root-authentication-method=socket --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MY/data" \
        --socket="$MY/mysqld.sock" --pid-file="$MY/mysqld.pid" --bind-address=127.0.0.1 \
        --port="$DBPORT" --log-error="$MY/mariadb.log" --skip-log-bin \
        --innodb-flush-log-at-trx-commit=0 --innodb-buffer-pool-size=1G \
        --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  fi
  wait_for 30 mariadb-admin --socket="$MY/mysqld.sock" ping || fail "mariadbd not answering"
  mariadb --socket="$MY/mysqld.sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'%' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  if ! alive "$BASE/slurmdbd.pid"; then
    cat >"$BASE/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$BASE/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$BASE/slurmdbd.conf"                  # slurmdbd refuses a readable one
    /usr/sbin/slurmdbd                               # no -f: finds it next to $SLURM_CONF
  fi
  wait_for 30 sacctmgr -n list cluster || fail "slurmdbd not answering"
  sacctmgr -n -P list cluster format=cluster | grep -qx ci || sacctmgr -i add cluster ci >/dev/null
fi

if [ $RESTART = 1 ]; then
  # 5. daemons: both fork into the background and write their pid files.
  #    No -c: keep the job-id counter, so ids never repeat in the accounting db.
  /usr/sbin/slurmctld -f "$CONF"
  /usr/sbin/slurmd -f "$CONF"
fi
# 6. ready = controller answers and the node is idle (or busy with earlier jobs)
node_up() { case "$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null)" in idle|mix|alloc) return 0;; esac; return 1; }
wait_for 30 node_up || fail "slurm node not ready: $(sinfo -h -N -o '%N %t %E' 2>&1)"

# 7. smoke test: a real batch job through slurmctld -> slurmd (about 1 s).
#    Poll scontrol rather than `sbatch --wait`, which polls at 2 s then 10 s.
if [ "${SLURM_SMOKE:-1}" = 1 ]; then
  J=$(sbatch --parsable -o /dev/null -J smoke --wrap true)
  for i in $(seq 300); do
    js=$(scontrol show job -o "$J" 2>/dev/null | grep -o "JobState=[A-Z_]*" | cut -d= -f2 || true)
    case "$js" in PENDING|CONFIGURING|RUNNING|COMPLETING|"") sleep 0.2;; *) break;; esac
  done
  [ "$js" = COMPLETED ] || fail "smoke job $J ended in state '$js'"
fi

echo "export SLURM_CONF=$CONF" >"$BASE/env.sh"
echo "slurm ready: node $NODE, partition debug, slurmctld pid $(cat "$BASE/slurmctld.pid"), slurmd pid $(cat "$BASE/slurmd.pid"), munged pid $(cat "$MUNGE_PID")"
[ "$ACCT" = 1 ] && echo "accounting: slurmdbd pid $(cat "$BASE/slurmdbd.pid"), mariadbd pid $(cat "$MY/mysqld.pid") (sacct works)"
echo "logs: $BASE/log"
echo "env: export SLURM_CONF=$CONF   (or: source $BASE/env.sh)"
